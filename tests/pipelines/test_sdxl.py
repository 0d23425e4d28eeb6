"""SDXL in the Pipeline: a tiny SDXL folder written by diffusers loads, and gives the images of diffusers'
StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on it (same weights, noise and scheduler) within 1/255
(max abs pixel difference, fp32 on the CPU); saved back by us, diffusers loads it with bit-equal weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from ldm.networks.text_sdxl import SDXLTextEncoder
from pipelines.call_options import OptionError
from pipelines.text_to_image import Pipeline
from tests.pipelines._parity import _init_image
from tests.pipelines._sdxl import write_sdxl_folder

PROMPTS = ["a red circle above a blue square", "two green stars"]
TOL = 1 / 255


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def ours(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(sdxl_folder):
    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, add_watermarker=False)


def _compare(ours, theirs, prompts, *, height=64, width=32, steps=3, **options):
    """Both pipelines on the same noise (Euler, the folder's scheduler): returns (ours, theirs) images."""
    n = len(prompts)
    latents = torch.randn(n, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=steps, latents=latents, height=height, width=width, output_type="np", **options)
    ref = theirs(prompts, **kw).images
    got = ours(prompts, sampler="euler", progress=False, **kw).images
    assert got.shape == ref.shape == (n, height, width, 3)
    return got, ref


def test_folder_loads_with_both_encoders(ours):
    enc = ours.text_encoder
    assert isinstance(enc, SDXLTextEncoder) and enc.force_zeros_for_empty_prompt
    assert enc.hidden_size == ours.unet.config.cross_attention_dim == 80 and enc.pooled_size == 24
    assert enc.text_encoder_2.tokenizer.pad_token == "!" and enc.text_encoder.tokenizer.pad_token == "<|endoftext|>"
    assert ours.vae.config.scaling_factor == 0.13025


# Negative time ids other than the positive ones with a batch of one: diffusers' StableDiffusionXLPipeline repeats its
# [negative; positive] pair of time ids over the batch, so with two prompts it conditions the second unconditional row
# on the positive ids and the first conditional row on the negative ones; ours gives each branch its own.
@pytest.mark.parametrize("prompts, options", [
    (PROMPTS, {"guidance_scale": 5.0}),  # no negative prompt: force_zeros_for_empty_prompt gives zero embeddings
    (PROMPTS, {"guidance_scale": 1.0}),  # the conditional branch alone
    (PROMPTS, {"guidance_scale": 7.5, "negative_prompt": ["blurry", "low quality, ugly"]}),
    (PROMPTS[:1], {"guidance_scale": 3.0, "original_size": (128, 96), "crops_coords_top_left": (8, 4),
                   "target_size": (64, 48), "negative_original_size": (32, 32),
                   "negative_crops_coords_top_left": (0, 0), "negative_target_size": (40, 24)}),
], ids=["zeros-negative", "scale-1", "negative-prompt", "micro-conditioning"])
def test_images_equal_diffusers(ours, theirs, prompts, options):
    got, ref = _compare(ours, theirs, prompts, **options)
    assert np.abs(got - ref).max() <= TOL, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    assert np.abs(ref - ref.mean()).max() > 0.01  # not constant, so the comparison can fail


def test_micro_conditioning_changes_the_image(ours):
    """The time ids reach the U-Net: another original size gives another image (so the parity above can fail)."""
    latents = torch.randn(1, 4, 8, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=3, latents=latents, height=64, width=32, output_type="np", progress=False,
              sampler="euler", guidance_scale=1.0)
    a = ours(PROMPTS[0], **kw).images
    b = ours(PROMPTS[0], original_size=(512, 512), **kw).images
    assert np.abs(a - b).max() > 1e-3


def test_img2img_equals_diffusers(ours, theirs, monkeypatch):
    """StableDiffusionXLImg2ImgPipeline (the base: no aesthetic score) on the same image, strength and noise; its
    `retrieve_latents` returns the posterior mode, as ours takes (tests/pipelines/test_pipeline.py)."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module

    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())
    pipe = StableDiffusionXLImg2ImgPipeline(**theirs.components, requires_aesthetics_score=False)
    kw = dict(num_inference_steps=8, strength=0.6, guidance_scale=6.0, output_type="np", negative_prompt="dark",
              original_size=(256, 256), target_size=(48, 40))
    ref = pipe(PROMPTS[0], image=_init_image(), generator=torch.Generator().manual_seed(2), **kw).images
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    got = ours(PROMPTS[0], image=_init_image(), latents=noise, sampler="euler", progress=False, **kw).images
    assert got.shape == ref.shape == (1, 32, 32, 3)
    assert np.abs(got - ref).max() <= TOL, f"max abs pixel difference {np.abs(got - ref).max():.2e}"


def test_saved_folder_loads_in_diffusers_with_equal_weights(ours, theirs, tmp_path):
    ours.save_pretrained(tmp_path / "saved")
    back = StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved", add_watermarker=False)
    assert back.config.force_zeros_for_empty_prompt is True
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(theirs, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(back, name)(PROMPTS).input_ids == getattr(theirs, name)(PROMPTS).input_ids
        assert getattr(back, name).pad_token == getattr(theirs, name).pad_token


def test_sdxl_options_are_checked_and_refused_elsewhere(ours):
    with pytest.raises(OptionError, match="original_size must be a pair of integers in \\[1, 65504\\]"):
        ours(PROMPTS[0], original_size=(0, 64), num_inference_steps=1, progress=False)
    with pytest.raises(OptionError, match="crops_coords_top_left must be a pair"):
        ours(PROMPTS[0], crops_coords_top_left=5, num_inference_steps=1, progress=False)
    with pytest.raises(OptionError, match="aesthetic_score is not read by this model: aesthetic scores are the SDXL "
                                          "refiner's"):
        ours(PROMPTS[0], aesthetic_score=7.0, num_inference_steps=1, progress=False)


def test_sdxl_options_on_an_sd_model_are_refused(tmp_path):
    from pipelines.tiny import tiny_components

    c = tiny_components()
    pipe = Pipeline(c.unet, c.vae, c.text_encoder, c.schedule, device="cpu", dtype=torch.float32)
    with pytest.raises(OptionError, match="target_size is SDXL's micro-conditioning; this model's U-Net takes none"):
        pipe("x", target_size=(32, 32), num_inference_steps=1, progress=False)
