"""A folder whose U-Net has a variance head (out_channels = 2 x latent channels) and a learned_range DDPMScheduler:
it loads here and in diffusers' StableDiffusionPipeline, samples as diffusers does at guidance 1, and an inconsistent
U-Net / scheduler pair is refused naming both."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from ldm.loading.components import IncompatibleComponentsError, save_pipeline
from ldm.networks.unet import UNet
from ldm.random import seeded
from pipelines.text_to_image import Pipeline
from pipelines.tiny import tiny_components

PROMPTS = ["a red circle above a blue square", "two green stars"]


def learned_components(seed: int = 0):
    """The tiny model with an 8-channel U-Net output: eps, then a variance head kept near v = 0.3 (small weights, so
    the variance stays finite on the final step, where diffusers clamps beta~ = 0 to 1e-20)."""
    c = tiny_components(seed)
    with seeded(seed + 5):
        unet = UNet(dataclasses.replace(c.unet.config, out_channels=8)).eval()
    with torch.no_grad():
        unet.conv_out.weight[4:] *= 0.05
        unet.conv_out.bias[4:] = 0.3
    return dataclasses.replace(c, unet=unet, schedule=dataclasses.replace(c.schedule, variance_type="learned_range"),
                               scheduler_config={"_class_name": "DDPMScheduler"})


@pytest.fixture(scope="module")
def learned_folder(tmp_path_factory):
    c = learned_components()
    path = tmp_path_factory.mktemp("learned") / "model"
    save_pipeline(path, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule,
                  scheduler_config=c.scheduler_config)
    return path


def test_learned_range_folder_samples_as_diffusers_ddpm_at_guidance_1(learned_folder) -> None:
    """Same weights, latents and generator, DDPM 6 steps: images within 1/255 of diffusers' (float32)."""
    ours = Pipeline.from_pretrained(learned_folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(learned_folder, safety_checker=None, requires_safety_checker=False)
    assert type(theirs.scheduler).__name__ == "DDPMScheduler"
    assert theirs.scheduler.config.variance_type == "learned_range"
    assert ours.schedule.variance_type == "learned_range"
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=6, guidance_scale=1.0, latents=latents, height=32, width=32, output_type="np")
    ref = theirs(PROMPTS, generator=torch.Generator().manual_seed(2), **kw).images
    got = ours(PROMPTS, generator=torch.Generator().manual_seed(2), sampler="ddpm", progress=False, **kw).images
    assert np.abs(got - ref).max() <= 1 / 255, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    fixed = ours.unet.conv_out.bias[4:].clone()
    with torch.no_grad():  # the head matters: moving it moves the images, so the comparison can fail
        ours.unet.conv_out.bias[4:] = -0.9
    other = ours(PROMPTS, generator=torch.Generator().manual_seed(2), sampler="ddpm", progress=False, **kw).images
    with torch.no_grad():
        ours.unet.conv_out.bias[4:] = fixed
    assert np.abs(other - got).max() > 2 / 255
    # with CFG and other samplers it runs (eps guided, the conditional variance; Euler uses eps only)
    for sampler in ("ddpm", "euler"):
        out = ours(PROMPTS, generator=torch.Generator().manual_seed(2), sampler=sampler, progress=False,
                   **{**kw, "guidance_scale": 3.0}).images
        assert np.isfinite(out).all()


def test_an_inconsistent_unet_and_scheduler_pair_is_refused(learned_folder, tmp_path) -> None:
    """8 output channels without a learned variance_type, or learned_range with 4, name the channels and the key."""
    bad = tmp_path / "bad"
    c = learned_components()
    with pytest.raises(IncompatibleComponentsError, match="returns 8 .*variance_type"):
        save_pipeline(bad, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder,
                      schedule=dataclasses.replace(c.schedule, variance_type=None))
    config = learned_folder / "scheduler" / "scheduler_config.json"
    saved = json.loads(config.read_text())
    try:
        config.write_text(json.dumps({**saved, "variance_type": "fixed_small"}))
        with pytest.raises(IncompatibleComponentsError, match="returns 8 .*valid: 4.*variance_type"):
            Pipeline.from_pretrained(learned_folder, device="cpu", dtype=torch.float32)
    finally:
        config.write_text(json.dumps(saved))
    fixed = tiny_components()
    with pytest.raises(IncompatibleComponentsError, match="returns 4 .*valid: 8"):
        Pipeline(fixed.unet, fixed.vae, fixed.text_encoder,
                 dataclasses.replace(fixed.schedule, variance_type="learned_range"), device="cpu")


def test_inpainting_a_learned_variance_model_keeps_the_head(learned_folder) -> None:
    """4-channel inpainting wraps the denoiser (pipelines.inpaint.RenoiseKnown): with the whole image masked at
    strength 1 it is text-to-image, so DDPM's learned variance must reach the sampler through the wrapper (dropping
    the head would sample with a fixed variance: a different image, checked below)."""
    pipe = Pipeline.from_pretrained(learned_folder, device="cpu", dtype=torch.float32)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=6, guidance_scale=1.0, latents=latents, height=32, width=32, output_type="np",
              sampler="ddpm", progress=False)
    plain = pipe(PROMPTS, generator=torch.Generator().manual_seed(2), **kw).images
    image, mask = np.full((32, 32, 3), 128, np.uint8), np.ones((32, 32), np.float32)
    inpainted = pipe(PROMPTS, image=image, mask_image=mask, strength=1.0, generator=torch.Generator().manual_seed(2),
                     **kw).images
    assert np.abs(inpainted - plain).max() <= 1e-6, f"max abs difference {np.abs(inpainted - plain).max():.2e}"
    with torch.no_grad():  # the head matters through the wrapper: moving it moves the inpainted images
        pipe.unet.conv_out.bias[4:] = -0.9
    moved = pipe(PROMPTS, image=image, mask_image=mask, strength=1.0, generator=torch.Generator().manual_seed(2),
                 **kw).images
    assert np.abs(moved - inpainted).max() > 2 / 255
