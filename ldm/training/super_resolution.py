"""Training a super-resolution stage of a cascade (Ho et al. 2021) with `ldm train`: the config section
`super_resolution:` turns latent-diffusion training (ldm.training.unet) into training an x4-upscaler-shaped stage.

Each step makes the low-resolution input on the fly from the high-resolution image: downsampled (antialiased) to the
latent grid (the VAE's factor, 4 for an x4 stage), then augmented as the stage will see it at sampling time: a
Gaussian blur with a random sigma and Gaussian noise at a random level of the low-res schedule
(ldm.diffusion.conditioning_augmentation), the level being the U-Net's class label. The U-Net sees the noisy latents
with that image on their channels (in_channels = latent + 3) and regresses the usual target. Everything else (data,
accelerate, checkpoints, resume, EMA) is ldm.training.unet's; the frozen parts and the export are a diffusers
StableDiffusionUpscalePipeline folder (ldm.loading.upscaler), which pipelines.Upscaler and diffusers both load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import dataclasses
import math

import torch
import torch.nn.functional as F

from autoencoder.model import AutoencoderKL

from ldm.config import ConfigError, load_config
from ldm.diffusion.conditioning_augmentation import random_augment
from ldm.diffusion.schedule import NoiseSchedule
from ldm.io import load_weights
from ldm.loading.components import Components, IncompatibleComponentsError
from ldm.loading.sources import load_components
from ldm.loading.upscaler import (UPSCALER_SCALING_FACTOR, UpscalerComponents, is_upscaler_folder, load_upscaler,
                                  save_upscaler)
from ldm.networks.unet import UNet, UNetConfig
from ldm.random import seeded


@dataclass
class SuperResolutionConfig:
    """The `super_resolution:` section of a training config: how the low-resolution input is made and augmented.

    blur_sigma: the range of the random blur's sigma, in low-res pixels; blur_prob: the probability that an image is
    blurred at all; max_noise_level: noise levels are drawn uniformly from 0 .. max_noise_level of `low_res_schedule`
    (the x4 upscaler's: DDPM's linear betas, 350); downsample: how the image is brought to the latent grid."""

    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_prob: float = 0.5
    max_noise_level: int = 350
    low_res_schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    downsample: Literal["bicubic", "bilinear", "area"] = "bicubic"
    # with model.pretrained a text-to-image model: a fresh U-Net of this config (a UNetConfig YAML, or a bundled name)
    # beside its text encoder and VAE; None: model.pretrained is an upscaler folder to fine-tune
    unet: str | None = None

    def __post_init__(self) -> None:
        lo, hi = self.blur_sigma
        if not 0 <= lo <= hi:
            raise ValueError(f"blur_sigma must be a range [lo, hi] with 0 <= lo <= hi, got {list(self.blur_sigma)}")
        if not 0 <= self.blur_prob <= 1:
            raise ValueError(f"blur_prob must lie in [0, 1], got {self.blur_prob}")
        if not 0 <= self.max_noise_level < self.low_res_schedule.num_train_timesteps:
            raise ValueError(f"max_noise_level must lie in [0, {self.low_res_schedule.num_train_timesteps - 1}] (the "
                             f"low-res schedule's timesteps), got {self.max_noise_level}")


def check_training_config(config: Any) -> None:
    """What a super-resolution run cannot combine with (a TrainConfig with `super_resolution` set)."""
    problems = []
    if config.run.validate_every:
        problems.append("run.validate_every must be 0 (the validation grid is text-to-image; sample the exported "
                        "folder with pipelines.Upscaler)")
    if config.run.cache_latents:
        problems.append("run.cache_latents must be false (the low-res input is made from each step's image)")
    if config.lora is not None or config.train_text_encoder:
        problems.append("lora and train_text_encoder are not supported for a super-resolution stage")
    if config.objective.align.weight > 0:
        problems.append("objective.align (REPA) is not supported for a super-resolution stage")
    if problems:
        raise ValueError("super_resolution: " + "; ".join(problems))


@torch.no_grad()
def rescale_latent_space(vae: AutoencoderKL, scaling_factor: float) -> AutoencoderKL:
    """The same autoencoder with latents k = scaling_factor_old / scaling_factor times larger, so that its scaled
    latents (z - shift) * scaling_factor are the old ones: quant_conv's mean rows times k and its log-variance bias
    + 2 log k (q(z|x) = N(k mu, k^2 sigma^2)), post_quant_conv's weights / k, shift_factor times k. Exact up to
    rounding (and logvar's clamp to [-30, 20]); in place, returned. A VAE without both 1x1 convolutions is refused."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("rescaling the latent space needs quant_conv and post_quant_conv (use_quant_conv, "
                         "use_post_quant_conv)")
    k = vae.config.scaling_factor / scaling_factor
    c = vae.config.latent_channels
    vae.quant_conv.weight[:c] *= k  # the mean rows; the log-variance rows follow
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    shift = None if vae.config.shift_factor is None else vae.config.shift_factor * k
    vae.config = dataclasses.replace(vae.config, scaling_factor=scaling_factor, shift_factor=shift)
    return vae


def upscaler_parts(sr: SuperResolutionConfig, parts: Components | UpscalerComponents) -> UpscalerComponents:
    """The stage's components: `parts` (from scratch, or a loaded upscaler folder) with the configured low-res
    schedule and max_noise_level; a VAE of another scaling factor has its latent space rescaled (exactly,
    `rescale_latent_space`) to the upscaler's 0.08333, which diffusers samples every upscaler with, so the U-Net
    learns latents of the variance the VAE was calibrated for. A ConfigError names what does not fit."""
    vae = parts.vae
    if vae.config.scaling_factor != UPSCALER_SCALING_FACTOR:
        vae = rescale_latent_space(vae, UPSCALER_SCALING_FACTOR)
    old = parts if isinstance(parts, UpscalerComponents) else None
    c = UpscalerComponents(parts.unet, vae, parts.text_encoder, parts.schedule, sr.low_res_schedule,
                           sr.max_noise_level, parts.scheduler_config, old.low_res_scheduler_config if old else None)
    try:
        c.check()
    except IncompatibleComponentsError as e:
        raise ConfigError(f"super_resolution: {e}") from e
    return c


def load_stage_parts(sr: SuperResolutionConfig, pretrained: str, init_seed: int = 0
                     ) -> Components | UpscalerComponents:
    """model.pretrained for a super-resolution run: an upscaler folder to fine-tune (sr.unet None), or a text-to-image
    model (a folder, a file, "default") whose text encoder and VAE the stage shares, with a fresh U-Net of sr.unet
    (seeded by model.init_seed): the parts are checked together by `upscaler_parts`."""
    if sr.unet is None:
        if not is_upscaler_folder(pretrained):
            raise ConfigError(f"super_resolution: model.pretrained {pretrained} is not an upscaler folder "
                              "(StableDiffusionUpscalePipeline); to train a new stage beside a text-to-image model's "
                              "text encoder and VAE, name the stage's U-Net config in super_resolution.unet")
        return load_upscaler(pretrained)
    parts = load_components(pretrained)
    with seeded(init_seed):
        parts.unet = UNet(load_config(UNetConfig, sr.unet))
    return parts


def downsample(images: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 3, *size), antialiased (bicubic / bilinear) or by averaging ("area"),
    clamped to [-1, 1] (bicubic overshoots at edges)."""
    if mode == "area":
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False).clamp(-1, 1)


class LowResConditioning:
    """The step's hook (ldm.training.diffusion_step.DiffusionStep): the batch's images -> the augmented low-res input on the
    latents' channels, and the noise levels as the U-Net's class labels."""

    def __init__(self, sr: SuperResolutionConfig, device: torch.device) -> None:
        self.sr, self.device = sr, device
        self.alphas_cumprod = sr.low_res_schedule.alphas_cumprod().to(device)

    def __call__(self, batch: dict[str, Any], gens: list[torch.Generator], z_t: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "pixel_values" not in batch:
            raise RuntimeError("a super-resolution step needs the batch's images (pixel_values)")
        high = batch["pixel_values"].to(self.device, torch.float32)  # (B, 3, H, W) in [-1, 1]
        low = downsample(high, tuple(z_t.shape[-2:]), self.sr.downsample)  # (B, 3, h, w): the latent grid
        low, levels = random_augment(low, self.alphas_cumprod, sigma_range=self.sr.blur_sigma,
                                     blur_prob=self.sr.blur_prob, max_noise_level=self.sr.max_noise_level,
                                     generator=gens)
        return torch.cat([z_t, low.to(z_t.dtype)], dim=1), {"class_labels": levels.to(self.device)}


def export_upscaler(ckpt: Path, frozen: Path, out_dir: str | Path, unet_state: dict[str, torch.Tensor], *,
                    overwrite: bool = False) -> Path:
    """The run's frozen upscaler folder with the checkpoint's U-Net weights (`unet_state`), written as a
    StableDiffusionUpscalePipeline folder (ldm.training.export.export's path for a super-resolution run)."""
    c = load_upscaler(frozen, unet_weights=False)
    load_weights(c.unet, unet_state, what=f"{ckpt} unet")
    save_upscaler(out_dir, c, overwrite=overwrite)
    return Path(out_dir)
