"""Image conversion at the pipeline's edges: PIL / numpy / tensor in, PIL / numpy / tensor out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image


def from_image(image: Any, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL image(s), a (H, W, 3) uint8 array or a (N, 3, H, W) tensor in [0, 1] -> (N, 3, H, W) float in [-1, 1].
    Resized (bicubic) to (height, width) when both are given and differ from the image's size."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and image and isinstance(image[0], Image.Image):
        tensors = []
        for im in image:
            im = im.convert("RGB")
            if height and width and im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BICUBIC)
            tensors.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        if len({t.shape for t in tensors}) != 1:
            raise ValueError(f"init images differ in size: {[tuple(t.shape[1:]) for t in tensors]}; pass height/width")
        return torch.stack(tensors).float() / 127.5 - 1
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a numpy init image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        return _resize(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1, height, width)
    if isinstance(image, torch.Tensor):
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"an init image tensor must be (N, 3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        lo, hi = image.min().item(), image.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"an init image tensor must have values in [0, 1], got min {lo:.3g} max {hi:.3g}"
                             " (a [-1, 1] tensor: pass (image + 1) / 2)")
        return _resize(image.float() * 2 - 1, height, width)
    raise TypeError(f"image must be a PIL image, a list of them, a uint8 array or a tensor; got {type(image).__name__}")


def _resize(images: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 3, height, width), bicubic with antialiasing, clamped to [-1, 1]; unchanged
    unless both sizes are given and differ."""
    if not (height and width) or tuple(images.shape[-2:]) == (height, width):
        return images
    out = torch.nn.functional.interpolate(images, size=(height, width), mode="bicubic", antialias=True,
                                          align_corners=False)
    return out.clamp(-1, 1)  # bicubic overshoots at edges


def to_output(images: torch.Tensor, output_type: str) -> Any:
    """(N, 3, H, W) in [0, 1] -> list of PIL images ("pil"), (N, H, W, 3) float array ("np") or the tensor ("pt")."""
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
