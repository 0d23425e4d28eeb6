"""Tiled encoding and decoding for images larger than the autoencoder was trained on: overlapping windows, each
output cross-faded linearly with its upper and left neighbours (diffusers' AutoencoderKL tiling, same blending order)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def _blend_ramp(n: int, like: torch.Tensor) -> torch.Tensor:
    """Linear weights y / n, y = 0..n-1, of the incoming tile in an n-wide overlap."""
    return (torch.arange(n, dtype=torch.float64) / n).to(device=like.device, dtype=like.dtype)


def blend_tiles(prev: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """Cross-fade the first `extent` rows (dim 2) or columns (dim 3) of `tile` with the last ones of `prev`:
    out_y = prev_{-extent + y} (1 - y / extent) + tile_y y / extent, as diffusers' blend_v / blend_h."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return tile
    w = _blend_ramp(extent, tile).reshape([-1 if d == dim else 1 for d in range(tile.ndim)])
    head = prev.narrow(dim, prev.shape[dim] - extent, extent) * (1 - w) + tile.narrow(dim, 0, extent) * w
    return torch.cat([head, tile.narrow(dim, extent, tile.shape[dim] - extent)], dim=dim)


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int, out_blend: int, out_keep: int
) -> torch.Tensor:
    """Apply `fn` to overlapping `tile`-sized windows of x taken every `stride` pixels, blend each output with its
    already-blended upper and left neighbours over `out_blend` pixels, keep the top-left `out_keep` of each, stitch."""
    grid: list[list[torch.Tensor]] = []
    for i in range(0, x.shape[2], stride):
        row: list[torch.Tensor] = []
        for j in range(0, x.shape[3], stride):
            out = fn(x[:, :, i : i + tile, j : j + tile])
            if grid:
                out = blend_tiles(grid[-1][len(row)], out, out_blend, dim=2)
            if row:
                out = blend_tiles(row[-1], out, out_blend, dim=3)
            row.append(out)
        grid.append(row)
    return torch.cat([torch.cat([t[:, :, :out_keep, :out_keep] for t in row], dim=3) for row in grid], dim=2)
