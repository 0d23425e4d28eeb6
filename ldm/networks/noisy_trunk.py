"""The image trunk shared by the noise-aware networks that guide sampling (ldm.networks.classifier's NoisyClassifier,
ldm.networks.noisy_clip's NoisyCLIP): residual conv blocks with the timestep embedding added (the U-Net's encoder in
miniature) and global average pooling, reading VP latents x_t at integer or fractional timesteps t of the diffusion
model's schedule. Also their folder format: config.json (the config dataclass + "_class_name") and model.safetensors,
where a missing or extra weight is an error naming the key and a wrong shape names the key and both shapes.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import from_dict, to_dict
from ldm.io import load_state_dict, read_json, save_state_dict, write_json
from ldm.networks.layers import timestep_embedding

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
M = TypeVar("M", bound=nn.Module)


def check_trunk_config(config: Any) -> None:
    """A trunk config's shape fields (in_channels, block_out_channels, time_embed_dim, norm_num_groups) make sense."""
    if not config.block_out_channels or any(c % config.norm_num_groups for c in config.block_out_channels):
        raise ValueError(f"block_out_channels {list(config.block_out_channels)} must be non-empty multiples of "
                         f"norm_num_groups {config.norm_num_groups}")
    if config.in_channels < 1 or config.time_embed_dim < 2:
        raise ValueError(f"in_channels must be >= 1 and time_embed_dim >= 2, got {config.in_channels}, "
                         f"{config.time_embed_dim}")


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


class NoisyTrunk(nn.Module):
    """features = trunk(x_t, t): (B, C, H, W) VP latents and (B,) timesteps -> (B, block_out_channels[-1]), pooled.
    Subclasses add their heads; the trunk's attributes sit at the top of their state dicts (time_mlp, conv_in,
    blocks, norm_out). `what` names the network in errors."""

    what = "the network"

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        d = config.time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        chans = (config.block_out_channels[0], *config.block_out_channels)
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)
        self.blocks = nn.ModuleList(_Block(a, b, d, config.norm_num_groups) for a, b in pairwise(chans))
        self.norm_out = nn.GroupNorm(config.norm_num_groups, chans[-1])

    @property
    def feature_dim(self) -> int:
        return int(self.config.block_out_channels[-1])

    def check_input(self, x: torch.Tensor) -> None:
        """x must be (B, in_channels, H, W); the error names the shape the network was trained on."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"{self.what} takes (B, {c.in_channels}, H, W) latents (trained at {c.sample_size} x "
                             f"{c.sample_size}), got shape {tuple(x.shape)}")

    def features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.check_input(x_t)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.config.time_embed_dim).to(x_t.dtype))  # (B, d)
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, emb)  # (B, C_i, H / 2^i, W / 2^i)
        return F.silu(self.norm_out(h)).mean(dim=(2, 3))  # (B, C_last)


def save_folder(model: nn.Module, folder: str | Path) -> None:
    """Write config.json ({"_class_name", **config}) and model.safetensors, each atomically."""
    folder = Path(folder)
    write_json({"_class_name": type(model).__name__, **to_dict(model.config)}, folder / CONFIG_NAME)
    save_state_dict(model.state_dict(), folder / WEIGHTS_NAME)


def load_folder(cls: type[M], config_cls: type, folder: str | Path) -> M:
    """A `cls(config)` from a folder written by save_folder, in eval mode: a config.json of another class, a missing
    or extra weight (named) or a weight of another shape (key and both shapes named) is an error."""
    folder = Path(folder)
    data = read_json(folder / CONFIG_NAME)
    name = data.get("_class_name", cls.__name__)
    if name != cls.__name__:
        raise ValueError(f"{folder / CONFIG_NAME}: the folder holds a {name}, not a {cls.__name__}")
    config = from_dict(config_cls, {k: v for k, v in data.items() if k != "_class_name"},
                       where=str(folder / CONFIG_NAME))
    model = cls(config)
    state, own = load_state_dict(folder / WEIGHTS_NAME), model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"{folder / WEIGHTS_NAME}: missing keys {missing[:5]}, unexpected keys {extra[:5]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{folder / WEIGHTS_NAME}: {key} has shape {tuple(value.shape)}, the config asks "
                             f"for {tuple(own[key].shape)}")
    model.load_state_dict(state)
    return model.eval()
