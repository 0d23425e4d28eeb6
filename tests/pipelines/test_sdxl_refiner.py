"""The SDXL refiner (one text encoder, an aesthetic score in place of the target size): a tiny refiner folder written
by diffusers' StableDiffusionXLImg2ImgPipeline loads and gives its image-to-image images within 1/255 (max abs pixel
difference, fp32 on the CPU); saved back, diffusers loads it with bit-equal weights and the same flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from pipelines.call_options import OptionError
from pipelines.text_to_image import Pipeline
from tests.pipelines._parity import _init_image
from tests.pipelines._sdxl import write_refiner_folder

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_refiner_folder(tmp_path_factory.mktemp("refiner"))


@pytest.fixture(scope="module")
def pipes(folder):
    ours = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False)
    return ours, theirs


def test_refiner_img2img_equals_diffusers(pipes, monkeypatch):
    """Aesthetic scores and sizes away from the defaults; negative crops as the positive ones (diffusers' refiner
    default for them is (0, 0), ours the positive crops: pipelines.conditioning)."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module

    ours, theirs = pipes
    assert ours.text_encoder.text_encoder is None and ours.text_encoder.requires_aesthetics_score
    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())
    kw = dict(num_inference_steps=6, strength=0.5, guidance_scale=5.0, output_type="np", aesthetic_score=7.5,
              negative_aesthetic_score=1.5, original_size=(96, 64), crops_coords_top_left=(4, 0),
              negative_crops_coords_top_left=(4, 0))
    ref = theirs(PROMPT, image=_init_image(), generator=torch.Generator().manual_seed(2), **kw).images
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    got = ours(PROMPT, image=_init_image(), latents=noise, sampler="euler", progress=False, **kw).images
    assert got.shape == ref.shape == (1, 32, 32, 3)
    assert np.abs(got - ref).max() <= 1 / 255, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    other = ours(PROMPT, image=_init_image(), latents=noise, sampler="euler", progress=False,
                 **{**kw, "aesthetic_score": 2.0}).images
    assert np.abs(got - other).max() > 1e-3  # the aesthetic score reaches the U-Net


def test_refiner_saves_back_for_diffusers(pipes, tmp_path):
    ours, theirs = pipes
    ours.save_pretrained(tmp_path / "saved")
    back = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "saved", add_watermarker=False)
    assert back.text_encoder is None and back.tokenizer is None
    assert back.config.requires_aesthetics_score is True and back.config.force_zeros_for_empty_prompt is False
    for name in ("unet", "vae", "text_encoder_2"):
        a, b = getattr(theirs, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_options_the_model_does_not_read_are_named(pipes):
    ours, _ = pipes
    with pytest.raises(OptionError, match="target_size is not read by this model: the SDXL refiner"):
        ours(PROMPT, target_size=(32, 32), num_inference_steps=1, progress=False)
    with pytest.raises(OptionError, match="aesthetic_score must be a finite number in \\[0, 10\\]"):
        ours(PROMPT, aesthetic_score=11.0, num_inference_steps=1, progress=False)
