"""Training a super-resolution stage (ldm.training.super_resolution) with `ldm train`'s machinery: the low-res input
made on the fly and augmented as configured (checked against the closed form on the same draws), a tiny run that
resumes bit for bit, and its export: a StableDiffusionUpscalePipeline folder that pipelines.Upscaler and diffusers
both load with the checkpoint's weights, bit-equal."""

from __future__ import annotations

import shutil

import pytest
import torch

from ldm.config import ConfigError
from ldm.diffusion.conditioning_augmentation import gaussian_blur
from ldm.io import load_state_dict
from ldm.training.config import TrainConfig, load_train_config
from ldm.training.export import export
from ldm.training.super_resolution import LowResConditioning, SuperResolutionConfig, downsample
from ldm.training.unet import train
from tests._helpers import ROOT, STEPS, same_weights, tiny_overrides
from tests.training.test_train import assert_same_checkpoint

CONFIG = ROOT / "ldm/configs/train-sr-tiny.yaml"


def sr_config(data, out, *extra: str) -> TrainConfig:
    return load_train_config(TrainConfig, CONFIG, tiny_overrides(data, out, *extra))


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("sr") / "run"
    train(sr_config(shapes, out))
    return out


def test_low_res_input_is_the_downsampled_image_blurred_and_noised():
    sr = SuperResolutionConfig(blur_sigma=(0.5, 0.5), blur_prob=1.0, max_noise_level=100)
    hook = LowResConditioning(sr, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    high = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z_t = torch.randn(2, 4, 8, 8, generator=g)
    x, extra = hook({"pixel_values": high}, [torch.Generator().manual_seed(s) for s in (1, 2)], z_t)
    assert x.shape == (2, 7, 8, 8) and torch.equal(x[:, :4], z_t)
    levels = extra["class_labels"]
    assert levels.dtype == torch.long and ((0 <= levels) & (levels <= 100)).all()
    # by hand, from the same draws: two uniforms (blur or not, its sigma), the level's uniform, then the noise
    low = gaussian_blur(downsample(high, (8, 8)), 0.5)
    ab = sr.low_res_schedule.alphas_cumprod()[levels].reshape(-1, 1, 1, 1)
    noise = []
    for s in (1, 2):
        gen = torch.Generator().manual_seed(s)
        torch.rand(3, generator=gen)  # the three uniforms drawn before the noise
        noise.append(torch.randn(1, 3, 8, 8, generator=gen))
    expected = ab.sqrt() * low + (1 - ab).sqrt() * torch.cat(noise)
    torch.testing.assert_close(x[:, 4:], expected, rtol=0, atol=1e-6)
    assert downsample(high, (8, 8)).abs().max() <= 1


@pytest.mark.slow
def test_run_resumes_bitwise_and_exports_an_upscaler_both_libraries_load(straight, shapes, tmp_path):
    from diffusers import StableDiffusionUpscalePipeline

    from pipelines.upscaler import Upscaler

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS - 2:08d}")
    train(sr_config(shapes, resumed, "run.resume=latest"))
    last = f"step-{STEPS:08d}"
    assert_same_checkpoint(straight / "checkpoints" / last, resumed / "checkpoints" / last)

    folder = export(straight, tmp_path / "export")
    ema = load_state_dict(straight / "checkpoints" / f"step-{STEPS:08d}" / "unet.ema.safetensors")
    ours = Upscaler.from_pretrained(folder, device="cpu", dtype=torch.float32)
    assert same_weights(ours.unet, ema) and ours.max_noise_level == 350
    theirs = StableDiffusionUpscalePipeline.from_pretrained(folder)
    assert same_weights(theirs.unet, ema)
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    image = ours("a red circle", image=low, num_inference_steps=2, seed=0, output_type="pt", progress=False).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_config_errors_name_the_problem(shapes, tmp_path):
    with pytest.raises(ConfigError, match="run.validate_every must be 0"):
        sr_config(shapes, tmp_path / "a", "run.validate_every=2")
    with pytest.raises(ConfigError, match="max_noise_level must lie in"):
        sr_config(shapes, tmp_path / "b", "super_resolution.max_noise_level=1000")
    with pytest.raises(ConfigError, match="an upscaler's takes the VAE's 4 latent"):
        train(sr_config(shapes, tmp_path / "c", "model.unet=unet-tiny.yaml"))
    assert not (tmp_path / "c" / "frozen").exists()


def test_rescaled_latent_space_is_the_same_autoencoder():
    """The bundled VAE's latents (scaling factor 0.492) carried to the upscaler's 0.08333 exactly: the same scaled
    latents for an image, the same image for scaled latents (fp32, <= 1e-5 relative to their range)."""
    import copy

    from autoencoder.model import AutoencoderKL, VAEConfig
    from ldm.config import load_config
    from ldm.random import seeded
    from ldm.training.super_resolution import rescale_latent_space

    with seeded(0):
        vae = AutoencoderKL(load_config(VAEConfig, "vae-upscaler-tiny.yaml")).eval()
        for p in vae.parameters():
            p.data.normal_(0, 0.1)  # biases too, so the log-variance shift is exercised
    vae.config = __import__("dataclasses").replace(vae.config, scaling_factor=0.492, shift_factor=0.1)
    new = rescale_latent_space(copy.deepcopy(vae), 0.08333)
    assert new.config.scaling_factor == 0.08333 and abs(new.config.shift_factor - 0.1 * 0.492 / 0.08333) < 1e-12
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        old_q, new_q = vae.encode(x), new.encode(x)
        torch.testing.assert_close(new.scale_latents(new_q.mode()), vae.scale_latents(old_q.mode()),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(new_q.std, old_q.std * 0.492 / 0.08333, rtol=1e-5, atol=1e-6)
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(new.decode(new.unscale_latents(z)), vae.decode(vae.unscale_latents(z)),
                                   rtol=1e-5, atol=1e-5)


def test_a_new_stage_beside_a_text_to_image_models_text_encoder_and_vae(shapes, tmp_path):
    """model.pretrained a text-to-image folder + super_resolution.unet: its text encoder and VAE (latent space
    rescaled to 0.08333, decoding the same images) with a fresh 7-channel U-Net; without it, an upscaler folder."""
    from ldm.config import load_yaml
    from ldm.loading.components import save_pipeline
    from ldm.loading.upscaler import UpscalerComponents
    from ldm.training.unet import build_components
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)
    save_pipeline(tmp_path / "base", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    data = load_yaml(CONFIG)
    data["model"] = {"pretrained": str(tmp_path / "base"), "init_seed": 0}
    data["super_resolution"]["unet"] = "unet-upscaler-tiny.yaml"
    config = load_train_config(TrainConfig, None, tiny_overrides(shapes, tmp_path / "run"), base=data)
    parts = build_components(config)
    assert isinstance(parts, UpscalerComponents) and parts.unet.config.in_channels == 7
    assert same_weights(parts.text_encoder.model, c.text_encoder.model)
    assert parts.vae.config.scaling_factor == 0.08333
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        new, old = (v.decode(v.unscale_latents(z)) for v in (parts.vae, c.vae))
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)
    del data["super_resolution"]["unet"]
    config = load_train_config(TrainConfig, None, tiny_overrides(shapes, tmp_path / "run"), base=data)
    with pytest.raises(ConfigError, match="is not an upscaler folder"):
        build_components(config)
