"""The bundled default model (pipelines/default_model, docs/default-model.md): it loads offline through Pipeline() and
in diffusers, follows simple prompts, and ships safetensors only within 80 MiB (its 64 -> 256 stage included, issue 27's budget); its CLIP matches images to captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm.shapes.detect import score_image
from ldm.training.clip import clip_text_encoder, load_clip
from ldm.loading.sources import DEFAULT_MODEL

PROMPTS = ["a red circle", "a blue square to the left of a yellow star", ""]
# The settings these tests were measured at: DPM++ 2M, 20 steps, guidance 3 (docs/quality.md: single-object
# all-correct 96% at s = 3 and at the best s = 5).
DEFAULTS = dict(num_inference_steps=20, guidance_scale=3.0, sampler="dpmpp_2m")



# ---------------------------------------------------------------------------------------- the bundled model


def test_bundled_folder_is_small_and_pickle_free():
    files = [p for p in DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert (DEFAULT_MODEL / "model_index.json").is_file() and (DEFAULT_MODEL / "clip" / "open_clip_config.json").is_file()
    total = sum(p.stat().st_size for p in files)
    assert total <= 80 * 2**20, f"{total / 2**20:.1f} MiB"
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")]
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"}  # pyproject package-data ships all of them


@pytest.fixture(scope="module")
def pipe():
    from pipelines.text_to_image import Pipeline

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return Pipeline(dtype=torch.float32)  # the bundled default model, offline; fp32: diffusers' arithmetic


def test_default_pipeline_follows_a_simple_prompt(pipe):
    """"a red circle" at the test settings, seeds 0-4: the detected object is red, a circle, and all-correct (also
    exactly one object) in >= 4 of 5 images each (measured 5/5, 5/5, 4/5; chance is 1/8 and 1/6 for colour and
    shape)."""
    images = pipe(["a red circle"] * 5, seed=list(range(5)), output_type="np", progress=False, **DEFAULTS).images
    assert images.shape == (5, 64, 64, 3)
    scores = [score_image("a red circle", im) for im in images]
    assert sum(s["color"] for s in scores) >= 4, scores
    assert sum(s["shape"] for s in scores) >= 4, scores
    assert sum(s["all"] for s in scores) >= 4, scores


def test_default_pipeline_puts_objects_where_the_prompt_says(pipe):
    """Three positions, seeds 0-4 each: the object's detected position is the prompt's in >= 12 of 15 images
    (measured 15/15; a model that ignores position words scores about 1 in 5, as the previous model did)."""
    prompts = ["a blue square on the left", "a yellow star at the top", "a green circle at the bottom"]
    hits = []
    for prompt in prompts:
        images = pipe([prompt] * 5, seed=list(range(5)), output_type="np", progress=False, **DEFAULTS).images
        hits += [bool(score_image(prompt, im)["position"]) for im in images]
    assert sum(hits) >= 12, hits


def test_default_pipeline_draws_the_readmes_two_object_prompt(pipe):
    """The README's first prompt, seeds 0-9: both shapes and both colours right in >= 8 of 10 and all attributes
    (with the relation "above") in >= 4 of 10 (measured 10/10, 10/10 and 6/10; guessing the shapes alone would get
    both right about 1 in 36)."""
    prompt = "a red circle above a blue square"
    images = pipe([prompt] * 10, seed=list(range(10)), output_type="np", progress=False, **DEFAULTS).images
    scores = [score_image(prompt, im) for im in images]
    assert sum(s["shape"] for s in scores) >= 8, scores
    assert sum(s["color"] for s in scores) >= 8, scores
    assert sum(s["all"] for s in scores) >= 4, scores


def test_default_pipeline_follows_colours(pipe):
    """Five other colours and shapes, one seed each: the colour is right in >= 4 of 5 and all attributes in >= 4 of 5
    (measured 5/5 and 5/5; a model that ignored the prompt would get colour right about 1 in 8)."""
    prompts = ["a blue square", "a yellow star", "a green triangle", "a white circle", "an orange diamond"]
    images = pipe(prompts, seed=10, output_type="np", progress=False, **DEFAULTS).images
    scores = [score_image(p, im) for p, im in zip(prompts, images)]
    assert sum(s["color"] for s in scores) >= 4, list(zip(prompts, scores))
    assert sum(s["all"] for s in scores) >= 4, list(zip(prompts, scores))


def test_default_model_loads_in_diffusers_and_matches(pipe):
    """diffusers' StableDiffusionPipeline reads the folder; with the same noise and Euler (10 steps) it gives our image:
    max abs pixel difference <= 1/255 at s = 1 and s = 3 (measured 3e-8 mean; diffusers' own fp32 vs fp64 differ by
    as much). The folder's scheduler must say steps_offset = 1: diffusers' pipeline rewrites any other value to 1,
    which shifts every timestep by one (that alone gave a 0.043 max difference)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    n = pipe.unet.config.sample_size
    latents = torch.randn(1, pipe.unet.config.in_channels, n, n, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 3.0):
        kw = dict(num_inference_steps=10, guidance_scale=scale, latents=latents, output_type="np")
        ref = theirs("a red circle", height=64, width=64, **kw).images
        got = pipe("a red circle", sampler="euler", progress=False, **kw).images
        assert ref.shape == got.shape == (1, 64, 64, 3)
        diff = np.abs(ref - got)
        assert diff.max() <= 1 / 255, (scale, diff.mean(), diff.max())
    assert score_image("a red circle", ref[0])["color"]  # diffusers' image has the red object too


def test_bundled_clip_matches_images_to_their_captions(pipe):
    """The small CLIP retrieves the right caption among 32 test images far above chance (1/32): top-1 >= 25%."""
    from ldm.shapes.dataset import dataset_item

    clip = load_clip(DEFAULT_MODEL / "clip", text_encoder_folder=DEFAULT_MODEL)
    items = [dataset_item(1, "train", i) for i in range(32)]
    x = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in items])).float().permute(0, 3, 1, 2) / 127.5 - 1
    ids = clip_text_encoder(clip, json.loads((DEFAULT_MODEL / "clip" / "open_clip_config.json").read_text())).tokenize(
        [c for _, c, _ in items])
    with torch.no_grad():
        sim = clip.encode_image(x, normalize=True) @ clip.encode_text(ids, normalize=True).T  # (32, 32)
    acc = float((sim.argmax(1) == torch.arange(32)).float().mean())
    assert acc >= 0.25, acc
