"""The bundled 64 -> 256 super-resolution stage (pipelines/default_model/upscaler, docs/default-model.md): a
StableDiffusionUpscalePipeline folder that diffusers loads with our weights, sharing the base model's text encoder,
its VAE rescaled exactly to the upscaler's scaling factor; Cascade() draws 256 x 256 images offline with it."""

from __future__ import annotations

import pytest
import torch

from ldm.loading.sources import DEFAULT_MODEL, DEFAULT_UPSCALER
from ldm.loading.upscaler import UPSCALER_SCALING_FACTOR, load_upscaler


@pytest.fixture(scope="module")
def stage():
    return load_upscaler(DEFAULT_UPSCALER)


def test_bundled_stage_is_an_upscaler_beside_the_base_model(stage):
    from ldm.loading.sources import load_components

    base = load_components(DEFAULT_MODEL)
    assert stage.unet.config.in_channels == 4 + 3 and stage.unet.config.num_class_embeds == 1000
    assert stage.max_noise_level == 350
    assert stage.vae.config.scaling_factor == UPSCALER_SCALING_FACTOR
    for (k, a), (k2, b) in zip(stage.text_encoder.state_dict().items(), base.text_encoder.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k  # the base model's text encoder, as trained with it
    # the rescaled VAE decodes the base VAE's latents: same images for z_new = z_old * k (k = 0.492 / 0.08333)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    k = base.vae.config.scaling_factor / stage.vae.config.scaling_factor
    with torch.no_grad():
        a, b = base.vae.decode(z), stage.vae.decode(z * k)
    a, b = (x if torch.is_tensor(x) else x.sample for x in (a, b))
    assert (a - b).abs().max() < 1e-4


def test_bundled_stage_loads_in_diffusers_with_our_weights(stage):
    from diffusers import StableDiffusionUpscalePipeline

    theirs = StableDiffusionUpscalePipeline.from_pretrained(DEFAULT_UPSCALER)
    assert theirs.max_noise_level == 350
    ours = stage.unet.state_dict()
    for key, value in theirs.unet.state_dict().items():
        assert torch.equal(ours[key], value), key


def test_cascade_draws_256_px_images_offline():
    from pipelines.cascade import Cascade

    images = Cascade()("a red circle", num_inference_steps=5, upscale_steps=3, seed=0, output_type="np",
                       progress=False).images
    assert images.shape == (1, 256, 256, 3) and images.min() >= 0 and images.max() <= 1
