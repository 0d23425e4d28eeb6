"""A noise-aware CLIP for CLIP guidance (GLIDE, Nichol et al. 2022, sec. 2.4): an image tower g(x_t, t) that reads
VP latents at the diffusion model's timesteps (the noisy classifier's trunk, ldm.networks.noisy_trunk, and a linear
projection) and a text tower h(c) = a linear projection of the pooled output of the text-to-image model's OWN text
encoder (the EOS state, `pooled_text`), both L2-normalised, with CLIP's learnable temperature (Radford et al. 2021).

GLIDE guides with mu + s Sigma grad (g(x_t, t) . h(c)); `pipelines.clip_guidance` turns g . h into the log_prob of
ldm.diffusion.denoiser.ClassifierGuidedDenoiser. Saved as a folder (config.json + model.safetensors, the classifier's
format); trained by ldm.training.noisy_clip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.networks.noisy_trunk import (
    NoisyTrunk,
    check_trunk_config,
    load_folder,
    save_folder,
)


@dataclass
class NoisyCLIPConfig:
    """Shape of the noise-aware CLIP: the trunk's fields (as ClassifierConfig's), `text_dim` (the pooled width of the
    model's text encoder) and `embed_dim` (the joint embedding)."""

    in_channels: int = 4
    sample_size: int = 16  # latent side it is trained at (pooling makes it work at others)
    block_out_channels: tuple[int, ...] = (32, 64)
    time_embed_dim: int = 64
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000  # its schedule's (the diffusion model's) training timesteps
    text_dim: int = 64
    embed_dim: int = 64

    def __post_init__(self) -> None:
        check_trunk_config(self)
        if self.text_dim < 1 or self.embed_dim < 1:
            raise ValueError(f"text_dim and embed_dim must be >= 1, got {self.text_dim}, {self.embed_dim}")


class NoisyCLIP(NoisyTrunk):
    """encode_image(x_t, t) -> (B, E) and encode_text(pooled) -> (B, E), unit vectors; forward: their cosine (B,)."""

    what = "the noise-aware CLIP"

    def __init__(self, config: NoisyCLIPConfig) -> None:
        super().__init__(config)
        self.image_proj = nn.Linear(self.feature_dim, config.embed_dim)
        self.text_proj = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def encode_image(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """g(x_t, t): (B, C, H, W) VP latents at timesteps (B,) -> (B, E), L2-normalised."""
        return F.normalize(self.image_proj(self.features(x_t, t)), dim=-1)

    def encode_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """h(c): the text encoder's pooled output (B, text_dim) -> (B, E), L2-normalised."""
        if pooled.ndim != 2 or pooled.shape[1] != self.config.text_dim:
            raise ValueError(f"the noise-aware CLIP takes pooled text embeddings (B, {self.config.text_dim}), got "
                             f"shape {tuple(pooled.shape)}")
        return F.normalize(self.text_proj(pooled.to(self.text_proj.weight.dtype)), dim=-1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """g(x_t, t) . h(c) per pair, (B,)."""
        return (self.encode_image(x_t, t) * self.encode_text(pooled)).sum(-1)

    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> NoisyCLIP:
        """Load a folder written by save_pretrained; a missing or extra weight is an error naming the key."""
        return load_folder(cls, NoisyCLIPConfig, folder)


def pooled_text_dim(text_encoder: Any) -> int:
    """The width of `pooled_text`'s output for this text encoder."""
    if hasattr(text_encoder, "pooled_size"):  # SDXL's pair: the second encoder's projected pooled embedding
        return int(text_encoder.pooled_size)
    config = text_encoder.model.config
    return int(config.projection_dim if hasattr(text_encoder.model, "text_projection") else config.hidden_size)


@torch.no_grad()
def pooled_text(text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """(B, text_dim) pooled text embeddings of prompts: the EOS state of a CLIP text model's first window (the whole
    prompt when it fits), ldm.networks.clip_text's `pooled`; SDXL's pair gives its projected `text_embeds`."""
    if hasattr(text_encoder, "pooled"):
        return text_encoder.pooled(prompts)
    ids = text_encoder.window_ids(prompts)[0][:, 0]  # (B, n)
    out = text_encoder.model(input_ids=ids.to(text_encoder._param.device))
    return out.text_embeds if hasattr(text_encoder.model, "text_projection") else out.pooler_output  # (B, D)
