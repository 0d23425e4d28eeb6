"""CLIP guidance for the Pipeline (GLIDE, Nichol et al. 2022, sec. 2.4): mu_hat = mu + s Sigma grad (g(x_t, t) . h(c)),
in sigma space D + s sigma^2 grad_x (g . h) (docs/guidance.md): `pipe(..., clip_guidance_scale=s, noisy_clip=...,
clip_prompt=...)` wraps the (CFG-)guided denoiser in ldm.diffusion.denoiser.ClassifierGuidedDenoiser with
log_prob = g . h of a noise-aware CLIP (ldm.networks.noisy_clip.NoisyCLIP, trained by ldm.training.noisy_clip).

g reads x / sqrt(1 + sigma^2) at the U-Net's own t(sigma) (pipelines.guidance_options.vp_network_input, shared with
classifier guidance); h(c) is the CLIP's projection of the pipeline's own text encoder's pooled output. A model
folder may hold the CLIP as `noisy_clip/` (the bundled model does); it is read only when a call uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.denoiser import ClassifierGuidedDenoiser, DiscreteVPDenoiser
from ldm.loading.sources import DEFAULT_MODEL, is_bundled
from ldm.networks.noisy_clip import NoisyCLIP, pooled_text, pooled_text_dim
from pipelines.call_options import OptionError, check_float
from pipelines.guidance_options import vp_network_input

FOLDER = "noisy_clip"  # a model folder's component, beside unet/, vae/, ...
NO_CLIP = ("this model has no noise-aware CLIP (no noisy_clip/ folder); train one with python -m "
           "ldm.training.noisy_clip --config train-noisy-clip-shapes.yaml pipeline=<this model's folder> "
           "output_dir=<folder>/noisy_clip, or pass noisy_clip=... (a NoisyCLIP, its folder, or \"default\")")


class ClipLogProb(nn.Module):
    """g(x_i / sqrt(1 + sigma_i^2), t(sigma_i)) . h_i, (B,), for text embeddings h (B, E): GLIDE's guidance term."""

    def __init__(self, clip: Any, denoiser: DiscreteVPDenoiser, text: torch.Tensor) -> None:
        super().__init__()
        self.clip, self.denoiser, self.text = clip, denoiser, text

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        if self.text.shape[0] != x.shape[0]:
            raise ValueError(f"got {self.text.shape[0]} text embeddings for a batch of {x.shape[0]}")
        return (self.clip.encode_image(*vp_network_input(self.denoiser, x, sigma)) * self.text).sum(-1)


@dataclass
class ClipGuide:
    """A call's checked CLIP guidance: the CLIP, what h(c) encodes (one per image) and the scale s > 0."""

    clip: NoisyCLIP
    prompts: list[str]
    scale: float


def model_folder(path: str | Path) -> Path | None:
    """The folder a Pipeline was loaded from, where its `noisy_clip/` would be (None for a single file or hub name)."""
    if is_bundled(path):
        return DEFAULT_MODEL
    p = Path(path).expanduser()
    return p if p.is_dir() else None


def load_noisy_clip(noisy_clip: NoisyCLIP | str | Path) -> NoisyCLIP:
    """A NoisyCLIP, or one loaded from its folder; "default": the bundled one (pipelines/default_model/noisy_clip)."""
    if isinstance(noisy_clip, NoisyCLIP):
        return noisy_clip
    if isinstance(noisy_clip, (str, Path)):
        return NoisyCLIP.from_pretrained(DEFAULT_MODEL / FOLDER if str(noisy_clip) == "default" else noisy_clip)
    raise OptionError("noisy_clip", type(noisy_clip).__name__, "a NoisyCLIP, the folder of one, or \"default\"")


def check_clip_guidance(pipe: Any, noisy_clip: NoisyCLIP | str | Path | None, scale: float, clip_prompt: Any,
                        prompts: list[str]) -> ClipGuide | None:
    """The call's CLIP guidance for `prompts` (one per image), or None when off (scale 0: exactly the unguided run).
    An OptionError, before any network runs, names a negative scale, a model without a noise-aware CLIP, a CLIP of
    another latent width / schedule length / text width, a bad clip_prompt, or an empty prompt with no clip_prompt."""
    scale = check_float("clip_guidance_scale", scale, 0.0, math.inf)
    n = len(prompts)
    if clip_prompt is not None:
        texts = [clip_prompt] * n if isinstance(clip_prompt, str) else clip_prompt
        if not isinstance(texts, (list, tuple)) or len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise OptionError("clip_prompt", clip_prompt, f"a string, or one per image ({n})")
        prompts = list(texts)
    if scale == 0 and noisy_clip is None:
        return None
    if noisy_clip is None:
        folder = getattr(pipe, "model_folder", None)
        if folder is None or not (Path(folder) / FOLDER / "config.json").is_file():
            raise OptionError("clip_guidance_scale", scale, text=f"{{option}} {scale:g} > 0, but {NO_CLIP}")
        noisy_clip = Path(folder) / FOLDER
    clip = load_noisy_clip(noisy_clip)
    c, channels = clip.config, pipe.vae.config.latent_channels
    if c.in_channels != channels:
        raise OptionError("noisy_clip", c.in_channels, text=f"{{option}} takes {c.in_channels}-channel latents "
                          f"(trained at {c.sample_size} x {c.sample_size}) but this model's latents have {channels} "
                          "channels: a noise-aware CLIP of another model")
    if c.num_train_timesteps != pipe.schedule.num_train_timesteps:
        raise OptionError("noisy_clip", c.num_train_timesteps, text=f"{{option}} was trained on "
                          f"{c.num_train_timesteps} timesteps but this model's schedule has "
                          f"{pipe.schedule.num_train_timesteps}")
    width = pooled_text_dim(pipe.text_encoder)
    if c.text_dim != width:
        raise OptionError("noisy_clip", c.text_dim, text=f"{{option}} reads {c.text_dim}-wide pooled text embeddings "
                          f"but this model's text encoder gives {width}: a noise-aware CLIP of another text encoder")
    if scale == 0:
        return None
    if any(not p.strip() for p in prompts):
        raise OptionError("clip_prompt", clip_prompt, text="{option} must say what CLIP guidance guides toward when "
                          "the prompt is empty (e.g. clip_prompt=\"a red circle\")")
    return ClipGuide(clip, prompts, float(scale))


def clip_guided(model: nn.Module, base: DiscreteVPDenoiser, guide: ClipGuide | None, text_encoder: Any,
                device: torch.device) -> nn.Module:
    """`model` (the pipeline's denoiser, CFG and other guidance included) with CLIP guidance:
    D + s sigma^2 grad_x (g(x, sigma) . h(c)); None: `model` itself."""
    if guide is None:
        return model
    clip = guide.clip.to(device, torch.float32).eval()
    with torch.no_grad():
        text = clip.encode_text(pooled_text(text_encoder, guide.prompts).to(device, torch.float32))  # (n, E)
    return ClassifierGuidedDenoiser(model, ClipLogProb(clip, base, text), guide.scale)
