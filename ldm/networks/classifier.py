"""A small noisy classifier f_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4): residual conv
blocks with the timestep embedding added (the U-Net's encoder in miniature), global average pooling, a linear head.

It reads VP latents x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) eps at integer or fractional timesteps t of its
schedule, as the U-Net does; `pipelines.guidance_options` turns it into the log p(y | x, sigma) of
ldm.diffusion.denoiser.ClassifierGuidedDenoiser. Saved as a folder: config.json (ClassifierConfig, with the class
names) and model.safetensors; trained by ldm.training.classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import from_dict, to_dict
from ldm.io import load_state_dict, read_json, save_state_dict, write_json
from ldm.networks.layers import timestep_embedding

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


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
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {list(self.block_out_channels)} must be non-empty multiples of "
                             f"norm_num_groups {self.norm_num_groups}")
        if self.in_channels < 1 or self.time_embed_dim < 2:
            raise ValueError(f"in_channels must be >= 1 and time_embed_dim >= 2, got {self.in_channels}, "
                             f"{self.time_embed_dim}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class _Block(nn.Module):
    """GroupNorm-SiLU-conv twice with the time embedding added in between, a residual connection, then 2x down."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(min(groups, c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.down = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.down(h + self.skip(x))


class NoisyClassifier(nn.Module):
    """logits = f(x_t, t): (B, C, H, W) VP latents and (B,) timesteps -> (B, num_classes)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        d = config.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        chans = (config.block_out_channels[0], *config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(_Block(a, b, d, config.norm_num_groups) for a, b in pairwise(chans))
        self.norm_out = nn.GroupNorm(config.norm_num_groups, chans[-1])
        self.head = nn.Linear(chans[-1], config.num_classes)

    def check_input(self, x: torch.Tensor) -> None:
        """x must be (B, in_channels, H, W); the error names the shape the classifier was trained on."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"the classifier takes (B, {c.in_channels}, H, W) latents (trained at {c.sample_size} x "
                             f"{c.sample_size}), got shape {tuple(x.shape)}")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_input(x_t)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.config.time_embed_dim).to(x_t.dtype))  # (B, d)
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, emb)  # (B, C_i, H / 2^i, W / 2^i)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))  # (B, num_classes)

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
        folder = Path(folder)
        write_json({"_class_name": "NoisyClassifier", **to_dict(self.config)}, folder / CONFIG_NAME)
        save_state_dict(self.state_dict(), folder / WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> NoisyClassifier:
        """Load a folder written by save_pretrained; a missing or extra weight is an error naming the key."""
        folder = Path(folder)
        data = read_json(folder / CONFIG_NAME)
        config = from_dict(ClassifierConfig, {k: v for k, v in data.items() if k != "_class_name"},
                           where=str(folder / CONFIG_NAME))
        model = cls(config)
        state = load_state_dict(folder / WEIGHTS_NAME)
        missing, extra = sorted(set(model.state_dict()) - set(state)), sorted(set(state) - set(model.state_dict()))
        if missing or extra:
            raise ValueError(f"{folder / WEIGHTS_NAME}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
        for key, value in state.items():
            want = model.state_dict()[key].shape
            if value.shape != want:
                raise ValueError(f"{folder / WEIGHTS_NAME}: {key} has shape {tuple(value.shape)}, the config asks "
                                 f"for {tuple(want)}")
        model.load_state_dict(state)
        return model.eval()

