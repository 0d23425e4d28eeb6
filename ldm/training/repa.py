"""Representation alignment (REPA; Yu et al. 2025, "Representation Alignment for Generation", sec. 3.2).

While the U-Net denoises z_t, a small MLP head h_phi reads the output of one of its blocks (B, C, h, w) and is
pulled, by cosine similarity, towards a frozen image encoder's patch features y* of the clean image x:

    L = L_diffusion + lambda * L_REPA,    L_REPA = -E[ 1/N sum_n sim(y*_n, h_phi(h_t)_n) ]    (REPA eq. 8)

Here the encoder is the image tower of an ldm.training.clip CLIP (open_clip ViT, pixels in [-1, 1]); its patch grid
is average-pooled to the block's grid. The head is training-only: it is checkpointed with the run and never exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """h_phi: a 3-layer MLP (SiLU) applied at every position, as 1 x 1 convolutions: (B, C, h, w) -> (B, D, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
                                 nn.Conv2d(hidden, out_channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_REPA per sample (B,): minus the mean over positions of cos(y*_n, h_phi(h_t)_n) (REPA eq. 8), with the
    target grid (B, D, H, W) average-pooled to the projection's (B, D, h, w)."""
    if projected.shape[:2] != target.shape[:2]:
        raise ValueError(f"projection {tuple(projected.shape)} and target {tuple(target.shape)} differ in batch or "
                         "feature width")
    h, w = projected.shape[-2:]
    if target.shape[-2] % h or target.shape[-1] % w:
        raise ValueError(f"the target grid {tuple(target.shape[-2:])} is not a multiple of the block's ({h}, {w})")
    target = F.adaptive_avg_pool2d(target.float(), (h, w))
    return -F.cosine_similarity(projected.float(), target, dim=1).mean(dim=(1, 2))


def block_output(model: nn.Module, name: str) -> nn.Module:
    """The submodule `name` (e.g. "down_blocks.1.attentions.0") of a U-Net, or a KeyError naming it."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        blocks = [n for n, _ in model.named_children()]
        raise KeyError(f"align.block: the U-Net has no submodule {name!r} (top level: {blocks})") from None


@contextlib.contextmanager
def captured(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, the list holds `module`'s latest (B, C, h, w) output (the first element of a tuple)."""
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> None:
        seen[:] = [output[0] if isinstance(output, (tuple, list)) else output]

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


class PatchFeatures(nn.Module):
    """The frozen CLIP image tower's patch tokens of images in [-1, 1]: (B, 3, H, W) -> (B, width, H / p, W / p)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = clip.visual.requires_grad_(False).eval()
        grid = self.visual.grid_size
        self.grid = (grid, grid) if isinstance(grid, int) else tuple(grid)

    @classmethod
    def from_folder(cls, folder: str | Path) -> PatchFeatures:
        from ldm.training.clip import load_clip  # the CLIP folder layout of ldm.training.clip

        return cls(load_clip(folder))

    @property
    def width(self) -> int:
        return int(self.visual.conv1.out_channels)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        previous, self.visual.output_tokens = self.visual.output_tokens, True
        try:
            _, tokens = self.visual(pixels)  # (B, N, width), after ln_post
        finally:
            self.visual.output_tokens = previous
        b, n, d = tokens.shape
        if n != self.grid[0] * self.grid[1]:
            raise ValueError(f"the image tower gave {n} patch tokens, expected {self.grid[0]} x {self.grid[1]}")
        return tokens.transpose(1, 2).reshape(b, d, *self.grid)


@dataclass
class Aligner:
    """What a training step needs for L_REPA: the target encoder, the projector (as prepared) and the hooked block."""

    features: PatchFeatures
    projector: nn.Module
    block: nn.Module


@torch.no_grad()
def output_channels(block: nn.Module, forward: Callable[[], object]) -> int:
    """C of `block`'s (B, C, h, w) output, read by running `forward` (a dry pass of the model) once."""
    with captured(block) as seen:
        forward()
    if not seen or seen[0].dim() != 4:
        got = "no output" if not seen else f"shape {tuple(seen[0].shape)}"
        raise ValueError(f"align.block must give a (B, C, h, w) feature map during the forward pass, got {got}")
    return int(seen[0].shape[1])
