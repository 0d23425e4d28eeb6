"""A small noisy classifier f_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4): residual conv
blocks with the timestep embedding added (the U-Net's encoder in miniature), global average pooling (the trunk it
shares with ldm.networks.noisy_clip, ldm.networks.noisy_trunk), a linear head.

It reads VP latents x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) eps at integer or fractional timesteps t of its
schedule, as the U-Net does; `pipelines.guidance_options` turns it into the log p(y | x, sigma) of
ldm.diffusion.denoiser.ClassifierGuidedDenoiser. Saved as a folder: config.json (ClassifierConfig, with the class
names) and model.safetensors; trained by ldm.training.classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldm.networks.noisy_trunk import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    NoisyTrunk,
    check_trunk_config,
    load_folder,
    save_folder,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "ClassifierConfig", "NoisyClassifier"]


@dataclass
class ClassifierConfig:
    """Shape of the classifier and what its classes are: `labels` names class i (e.g. the shapes world's colours),
    `attribute` says what they label (a metadata key path of the training data, e.g. "prompt.objects.0.color")."""

    in_channels: int = 4
    sample_size: int = 16  # latent side it is trained at (pooling makes it work at others)
    labels: tuple[str, ...] = ("red", "green", "blue")
    attribute: str = "prompt.objects.0.color"
    block_out_channels: tuple[int, ...] = (32, 64)
    time_embed_dim: int = 64
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000  # its schedule's (the diffusion model's) training timesteps

    def __post_init__(self) -> None:
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must name at least 2 distinct classes, got {list(self.labels)}")
        check_trunk_config(self)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class NoisyClassifier(NoisyTrunk):
    """logits = f(x_t, t): (B, C, H, W) VP latents and (B,) timesteps -> (B, num_classes), a linear head on the
    pooled trunk features (ldm.networks.noisy_trunk)."""

    what = "the classifier"

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(self.feature_dim, config.num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x_t, t))  # (B, num_classes)

    def label_index(self, label: int | str) -> int:
        """A class index from its index or name; an error lists the valid ones."""
        labels = self.config.labels
        if isinstance(label, str) and label in labels:
            return labels.index(label)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
            return label
        raise ValueError(f"label {label!r} is not a class of this classifier; valid: 0..{len(labels) - 1} or "
                         f"{list(labels)}")

    def save_pretrained(self, folder: str | Path) -> None:
        save_folder(self, folder)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> NoisyClassifier:
        """Load a folder written by save_pretrained; a missing or extra weight is an error naming the key."""
        return load_folder(cls, ClassifierConfig, folder)
