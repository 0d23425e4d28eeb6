"""The prompt options of a call: `clip_skip` gives diffusers' StableDiffusionPipeline(clip_skip=) image, a prompt past
77 tokens gives diffusers' image on the same (windowed) embeddings, `prompt_syntax` and `clip_skip` are checked before
any network runs, and `ldm generate --clip-skip / --emphasis` reach the pipeline.

The tiny folder of conftest.py (a 2-layer CLIP text encoder: clip_skip 0 or 1), fp32, images within 1/255.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from ldm.networks.unet import UNet
from pipelines.call_options import OptionError, check_call_options
from pipelines.cli import main

LONG = " ".join(["a red circle above a blue square"] * 14)  # 98 tokens: two windows
NEGATIVE = "blurry, green"
STEPS, SCALE = 3, 7.5


def _run(pipe, **options):
    """One call (guided at SCALE unless given) at 32 px with fixed latents and generator; ours or diffusers'."""
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    options = {"guidance_scale": SCALE, **options}
    return pipe(num_inference_steps=STEPS, latents=latents, height=32, width=32,
                generator=torch.Generator().manual_seed(2), output_type="np", **options).images


@pytest.fixture
def theirs_euler(theirs):
    """diffusers' pipeline with Euler, and the `text_model` attribute its clip_skip path reads (transformers 5's
    CLIPTextModel holds final_layer_norm itself); both undone afterwards."""
    scheduler = theirs.scheduler
    theirs.scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
    object.__setattr__(theirs.text_encoder, "text_model", theirs.text_encoder)  # not a submodule: no cycle
    yield theirs
    theirs.scheduler = scheduler
    del theirs.text_encoder.__dict__["text_model"]


@torch.no_grad()
def test_clip_skip_equals_diffusers(ours, theirs_euler):
    """Unguided (scale 1: the prompt's branch alone) our image is diffusers' with its clip_skip=. Guided, diffusers
    reads clip_skip for the prompt only and the last layer for the negative (encode_prompt; diffusers PRs #13796,
    #13973 call that a bug); we read it for both, as A1111: the same as diffusers handed the negative's embedding of
    its own clip_skip path."""
    ref = _run(theirs_euler, prompt="a red circle", clip_skip=1, guidance_scale=1.0)
    mine = _run(ours, prompt="a red circle", clip_skip=1, guidance_scale=1.0, sampler="euler", progress=False)
    assert np.abs(mine - ref).max() <= 1 / 255, f"unguided: {np.abs(mine - ref).max():.2e}"
    got = {}
    for skip in (None, 1):  # None: the text encoder's own layer (its last here, as clip_skip=0)
        negative, _ = theirs_euler.encode_prompt(NEGATIVE, "cpu", 1, False, clip_skip=skip)
        ref = _run(theirs_euler, prompt="a red circle", negative_prompt_embeds=negative, clip_skip=skip)
        got[skip] = _run(ours, prompt="a red circle", negative_prompt=NEGATIVE, clip_skip=skip, sampler="euler",
                         progress=False)
        assert np.abs(got[skip] - ref).max() <= 1 / 255, f"clip_skip={skip}: {np.abs(got[skip] - ref).max():.2e}"
    assert np.abs(got[1] - got[None]).max() > 0.01  # another layer, another image: the comparison can fail


@torch.no_grad()
def test_long_prompt_image_equals_diffusers_on_the_windowed_embeddings(ours, theirs_euler):
    """diffusers truncates at 77 tokens; handed our (1, 154, D) embeddings of prompt and negative it gives our image:
    the U-Net's cross-attention takes the longer sequence alike."""
    c, u = ours.text_encoder.encode_pair([LONG], [NEGATIVE])
    assert c.shape == u.shape == (1, 154, 32)
    ref = _run(theirs_euler, prompt_embeds=c, negative_prompt_embeds=u)
    got = _run(ours, prompt=LONG, negative_prompt=NEGATIVE, sampler="euler", progress=False)
    assert np.abs(got - ref).max() <= 1 / 255, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    truncated = _run(theirs_euler, prompt=LONG, negative_prompt=NEGATIVE)
    assert np.abs(got - truncated).max() > 1 / 255  # the second window changes the image


@torch.no_grad()
def test_emphasis_is_opt_in(ours):
    """Brackets are prompt text unless prompt_syntax="a1111"."""
    plain = _run(ours, prompt="a (red:1.5) circle", sampler="euler", progress=False)
    weighted = _run(ours, prompt="a (red:1.5) circle", sampler="euler", progress=False, prompt_syntax="a1111")
    assert np.abs(plain - weighted).max() > 1 / 255
    c = ours.text_encoder.encode_pair(["a (red:1.5) circle"], [""], syntax="plain")[0]
    assert torch.equal(c, ours.text_encoder.encode_pair(["a (red:1.5) circle"], [""])[0])  # "plain" is the default
    # without emphasis in it the a1111 reading is the plain one: tests/networks/test_long_prompts.py


@pytest.mark.parametrize(("options", "message"), [
    ({"clip_skip": -1}, r"clip_skip must be an integer >= 0 \(layers skipped\), got -1"),
    ({"clip_skip": 1.0}, r"clip_skip must be an integer"),
    ({"clip_skip": True}, r"clip_skip must be an integer"),
    ({"clip_skip": 2}, r"clip_skip must be an integer in \[0, 1\] \(this text encoder has 2 layers\), got 2"),
    ({"prompt_syntax": "compel"}, r"prompt_syntax: unknown prompt syntax 'compel'; valid: plain, a1111"),
])
def test_bad_prompt_options_are_refused_before_any_network_runs(ours, monkeypatch, options, message):
    def refuse(*args, **kwargs):
        raise AssertionError("a network ran")

    monkeypatch.setattr(UNet, "forward", refuse)
    monkeypatch.setattr(type(ours.text_encoder), "encode_pair", refuse)
    with pytest.raises(OptionError, match=message):
        ours("a red circle", num_inference_steps=2, progress=False, **options)
    if options != {"clip_skip": 2}:  # what needs no model is refused by the options check alone
        with pytest.raises(OptionError, match=message):
            check_call_options("a red circle", **options)


def test_cli_flags_reach_the_pipeline(folder, tmp_path, monkeypatch, capsys):
    from pipelines.text_to_image import Pipeline

    seen = {}
    call = Pipeline.__call__

    def spy(self, prompt, **kwargs):
        seen.update(clip_skip=kwargs["clip_skip"], prompt_syntax=kwargs["prompt_syntax"])
        return call(self, prompt, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    out = tmp_path / "x.png"
    args = ["generate", "a (red:1.3) circle", "-o", str(out), "--model", str(folder), "--steps", "1", "--no-progress",
            "--device", "cpu"]
    assert main([*args, "--clip-skip", "1", "--emphasis"]) == 0 and out.is_file()
    assert seen == {"clip_skip": 1, "prompt_syntax": "a1111"}
    assert main(args) == 0 and seen == {"clip_skip": None, "prompt_syntax": "plain"}
    assert main([*args, "--clip-skip", "5"]) == 2
    assert "--clip-skip must be an integer in [0, 1]" in capsys.readouterr().err
