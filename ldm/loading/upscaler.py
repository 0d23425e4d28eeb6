"""A super-resolution stage's parts and their folder in diffusers' StableDiffusionUpscalePipeline layout (the
Stable Diffusion x4 upscaler's): model_index.json (with `max_noise_level`), unet/ (latents + the low-resolution image
on its channels, the noise level as its class label), vae/ (f = 4, scaling factor 0.08333), text_encoder/,
tokenizer/, scheduler/ (sampling) and low_res_scheduler/ (the DDPM schedule that noises the low-resolution image)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autoencoder.model import AutoencoderKL
from ldm.diffusion.schedule import NoiseSchedule
from ldm.io import MAX_CONFIG_BYTES, ConfigError, atomic_directory, read_json, write_json
from ldm.loading.components import (IncompatibleComponentsError, _unet_without_weights, load_schedule, save_schedule,
                                    scheduler_class)
from ldm.networks.text import TextEncoder
from ldm.networks.unet import UNet

UPSCALER_CLASS = "StableDiffusionUpscalePipeline"
# diffusers' StableDiffusionUpscalePipeline uses this VAE scaling factor whatever vae/config.json says (it rewrites any
# other value, with a deprecation warning), and 350 as max_noise_level when model_index.json names none
UPSCALER_SCALING_FACTOR = 0.08333
DEFAULT_MAX_NOISE_LEVEL = 350
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "low_res_scheduler")


@dataclass
class UpscalerComponents:
    """The parts of a text-guided super-resolution stage: the sampling `schedule`, and the `low_res_schedule` whose
    alphā at `noise_level` (<= max_noise_level) noises the low-resolution image (the U-Net's class label)."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    schedule: NoiseSchedule
    low_res_schedule: NoiseSchedule
    max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL
    # the scheduler configs they were read from: their class and the keys we do not model are written back
    scheduler_config: dict[str, Any] | None = None
    low_res_scheduler_config: dict[str, Any] | None = None

    def check(self) -> None:
        check_upscaler_components(self.unet, self.vae, self.text_encoder, self.low_res_schedule, self.max_noise_level)


def check_upscaler_components(unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder,
                              low_res_schedule: NoiseSchedule, max_noise_level: int) -> None:
    """The U-Net takes the VAE's latents and the image on its channels, returns latents, reads the text's width and
    has a class embedding (the noise level); max_noise_level is a timestep of the low-res schedule. Else an
    IncompatibleComponentsError naming the sizes."""
    cfg, latent, image = unet.config, vae.config.latent_channels, vae.config.in_channels
    problems = []
    if text_encoder.hidden_size != cfg.cross_attention_dim:
        problems.append(f"the text encoder's embedding size is {text_encoder.hidden_size} but the U-Net's "
                        f"cross_attention_dim is {cfg.cross_attention_dim}")
    if cfg.in_channels != latent + image or cfg.out_channels != latent:
        problems.append(f"the U-Net takes {cfg.in_channels} channels and returns {cfg.out_channels}, but an upscaler's "
                        f"takes the VAE's {latent} latent + {image} image channels and returns {latent}")
    if cfg.num_class_embeds is None:
        problems.append("the U-Net has no class embedding (num_class_embeds) for the noise level")
    if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, int) or \
            not 0 <= max_noise_level < low_res_schedule.num_train_timesteps:
        problems.append(f"max_noise_level {max_noise_level!r} is not a timestep of the low-res schedule "
                        f"(0 .. {low_res_schedule.num_train_timesteps - 1})")
    if problems:
        raise IncompatibleComponentsError("upscaler components do not fit together: " + "; ".join(problems))


def upscaler_vae(vae: AutoencoderKL, where: str) -> AutoencoderKL:
    """The VAE with the scaling factor diffusers' StableDiffusionUpscalePipeline samples with (0.08333: it rewrites
    any other, and so do we, with a warning naming `where`)."""
    if vae.config.scaling_factor != UPSCALER_SCALING_FACTOR:
        warnings.warn(f"{where}: scaling_factor is {vae.config.scaling_factor}; sampling with "
                      f"{UPSCALER_SCALING_FACTOR}, as diffusers' StableDiffusionUpscalePipeline does for every "
                      "upscaler", stacklevel=3)
        vae.config = dataclasses.replace(vae.config, scaling_factor=UPSCALER_SCALING_FACTOR)
    return vae


def upscaler_index(scheduler: str, low_res_scheduler: str, max_noise_level: int) -> dict[str, Any]:
    """diffusers' model_index.json of a StableDiffusionUpscalePipeline without safety checker or watermarker."""
    import diffusers

    return {
        "_class_name": UPSCALER_CLASS, "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "low_res_scheduler": ["diffusers", low_res_scheduler],
        "max_noise_level": max_noise_level, "safety_checker": [None, None], "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "watermarker": [None, None],
    }


def is_upscaler_folder(path: str | Path) -> bool:
    """Whether `path` holds a model_index.json naming StableDiffusionUpscalePipeline."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return read_json(index, max_bytes=MAX_CONFIG_BYTES).get("_class_name") == UPSCALER_CLASS
    except (ConfigError, OSError, ValueError):
        return False


def save_upscaler(folder: str | Path, c: UpscalerComponents, *, unet_weights: bool = True,
                  overwrite: bool = False) -> None:
    """Write a StableDiffusionUpscalePipeline folder (safetensors), whole or not at all; it replaces an upscaler
    folder, a folder of anything else only with overwrite=True. unet_weights=False writes only the U-Net's config."""
    c.check()
    low_res_config = c.low_res_scheduler_config or {"_class_name": "DDPMScheduler"}
    with atomic_directory(folder, may_replace=lambda p: overwrite or is_upscaler_folder(p)) as tmp:
        if unet_weights:
            c.unet.save_pretrained(tmp / "unet")
        else:
            write_json({"_class_name": "UNet2DConditionModel", **c.unet.config.to_diffusers()},
                       tmp / "unet" / "config.json")
        c.vae.save_pretrained(tmp / "vae")
        c.text_encoder.save_pretrained(tmp)  # text_encoder/ and tokenizer/
        save_schedule(c.schedule, tmp / "scheduler", c.scheduler_config)
        save_schedule(c.low_res_schedule, tmp / "low_res_scheduler", low_res_config)
        write_json(upscaler_index(scheduler_class(c.scheduler_config), scheduler_class(low_res_config),
                                  c.max_noise_level), tmp / "model_index.json")


def load_upscaler(folder: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None,
                  unet_weights: bool = True) -> UpscalerComponents:
    """Read a StableDiffusionUpscalePipeline folder (ours or diffusers') into our modules; errors name the part.
    unet_weights=False builds the U-Net from its config alone (a training run's frozen folder; export fills it)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder: model_index.json is missing")
    index = read_json(folder / "model_index.json", max_bytes=MAX_CONFIG_BYTES)
    if index.get("_class_name") != UPSCALER_CLASS:
        raise ValueError(f"{folder} holds a {index.get('_class_name')!r}, not a {UPSCALER_CLASS} (an upscaler folder)")
    missing = [name for name in _SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is incomplete: missing subfolder(s) {missing}")
    max_noise_level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
    if isinstance(max_noise_level, bool) or not isinstance(max_noise_level, int):
        raise ConfigError(f"{folder / 'model_index.json'}: max_noise_level must be an integer, got {max_noise_level!r}")
    vae = AutoencoderKL.from_pretrained(folder / "vae", allow_pickle=allow_pickle, dtype=dtype)
    c = UpscalerComponents(
        unet=(UNet.from_pretrained(folder / "unet", allow_pickle=allow_pickle, dtype=dtype) if unet_weights
              else _unet_without_weights(folder / "unet" / "config.json")).eval(),
        vae=upscaler_vae(vae, str(folder / "vae")).eval(),
        text_encoder=TextEncoder.from_pretrained(folder, dtype=dtype).eval(),
        schedule=load_schedule(folder / "scheduler"),
        low_res_schedule=load_schedule(folder / "low_res_scheduler"),
        max_noise_level=max_noise_level,
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json", max_bytes=MAX_CONFIG_BYTES),
        low_res_scheduler_config=read_json(folder / "low_res_scheduler" / "scheduler_config.json",
                                           max_bytes=MAX_CONFIG_BYTES),
    )
    c.check()
    return c
