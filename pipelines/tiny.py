"""A tiny text-to-image model with seeded random weights (SD structure, ~3 M parameters): for tests and examples."""

from __future__ import annotations

import dataclasses

from transformers import CLIPTextConfig

from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.config import BUNDLED_CONFIGS, load_config
from ldm.random import seeded
from ldm.networks.text import TextEncoder
from ldm.diffusion.schedule import NoiseSchedule, sd_schedule
from ldm.networks.unet import UNet, UNetConfig
from ldm.loading.components import Components
from ldm.loading.upscaler import UpscalerComponents



def tiny_text_config(hidden_size: int = 32) -> CLIPTextConfig:
    """A 2-layer CLIP text transformer with the real vocabulary (so the offline tokenizer fits)."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden_size, intermediate_size=4 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=hidden_size,
    )  # fmt: skip


def tiny_components(seed: int = 0, *, text_hidden_size: int = 32) -> Components:
    """U-Net (ldm/configs/unet-tiny.yaml), VAE (ldm/configs/vae-tiny.yaml), a tiny CLIP text encoder and SD's schedule."""
    with seeded(seed):
        unet = UNet(load_config(UNetConfig, BUNDLED_CONFIGS / "unet-tiny.yaml")).eval()
        vae = AutoencoderKL(load_config(VAEConfig, BUNDLED_CONFIGS / "vae-tiny.yaml")).eval()
    text = TextEncoder.from_config(tiny_text_config(text_hidden_size), seed=seed + 1).eval()
    return Components(unet=unet, vae=vae, text_encoder=text, schedule=sd_schedule())


def tiny_upscaler_components(seed: int = 0) -> UpscalerComponents:
    """An x4-upscaler-shaped stage: U-Net (ldm/configs/unet-upscaler-tiny.yaml), f = 4 VAE (vae-upscaler-tiny.yaml),
    a tiny CLIP text encoder, the upscaler's schedules (v-prediction DDIM-style sampling; DDPM's linear betas for
    the low-resolution image) and max_noise_level 350."""
    with seeded(seed):
        unet = UNet(load_config(UNetConfig, BUNDLED_CONFIGS / "unet-upscaler-tiny.yaml")).eval()
        vae = AutoencoderKL(load_config(VAEConfig, BUNDLED_CONFIGS / "vae-upscaler-tiny.yaml")).eval()
    text = TextEncoder.from_config(tiny_text_config(32), seed=seed + 1).eval()
    schedule = dataclasses.replace(sd_schedule(), prediction_type="v_prediction", set_alpha_to_one=False)
    return UpscalerComponents(unet, vae, text, schedule, NoiseSchedule(), 350)
