"""A LoRA module as data and the key conventions both file layouts share (ldm.lora.weights, ldm.lora.kohya).

A LoRA module is one low-rank update of a layer's weight (Hu et al. 2021, "LoRA", eq. 3):
W' = W + scale * (alpha / r) * up @ down. `LoraWeights` keys are "unet.<module path>" / "text_encoder.<module path>"
(our module names: diffusers' U-Net names, transformers' flattened CLIPTextModel names without "text_model.").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm.io import WeightsError

PREFIXES = ("unet", "text_encoder", "text_encoder_2")
TEXT_MODEL = "text_model."  # transformers' CLIPTextModel before version 5 nests its modules under it


@dataclass
class LoraModule:
    """One low-rank update W += scale * (alpha / rank) * up @ down (Hu et al. 2021, eq. 3)."""

    down: torch.Tensor  # (r, in) Linear, (r, in, kh, kw) conv   (peft lora_A, kohya lora_down)
    up: torch.Tensor  # (out, r) Linear, (out, r, 1, 1) conv       (peft lora_B, kohya lora_up)
    alpha: float
    source: str = ""  # the file's name for it, when read from a file (errors name it)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> torch.Tensor:
        """(alpha / r) * up @ down in the shape of the layer's weight, float32."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2:
            return self.alpha / self.rank * (up @ down)
        return self.alpha / self.rank * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)  # (out, in, kh, kw)


LoraWeights = dict[str, LoraModule]  # "unet.<module path>" / "text_encoder.<module path>" -> LoraModule


def check_module(key: str, m: LoraModule) -> None:
    """The shapes of a LoRA module fit each other: down (r, in[, kh, kw]), up (out, r[, 1, 1]); errors name the key."""
    down, up = tuple(m.down.shape), tuple(m.up.shape)
    if m.down.ndim not in (2, 4) or m.up.ndim != m.down.ndim:
        raise WeightsError(f"LoRA {key}: down {down} and up {up} must both be 2-D (Linear) or 4-D (convolution)")
    if up[1] != down[0]:
        raise WeightsError(f"LoRA {key}: up {up} has rank {up[1]} where down {down} has rank {down[0]}")
    if m.up.ndim == 4 and up[2:] != (1, 1):
        raise WeightsError(f"LoRA {key}: a convolution's up must be (out, r, 1, 1), got {up}")
    if not (m.down.is_floating_point() and m.up.is_floating_point()):
        raise WeightsError(f"LoRA {key}: weights of dtype {m.down.dtype} / {m.up.dtype}, expected floating point")
    if not (m.alpha == m.alpha and abs(m.alpha) < float("inf")):  # NaN or infinite
        raise WeightsError(f"LoRA {key}: alpha {m.alpha} is not a finite number")


def split_key(key: str) -> tuple[str, str]:
    """("unet", "down_blocks.0...") of a LoraWeights key; a key of no known component is an error naming it."""
    prefix, _, module = key.partition(".")
    if prefix not in PREFIXES or not module:
        raise WeightsError(f"LoRA key {key!r} names no component: expected one of {[p + '.' for p in PREFIXES]}")
    return prefix, module


def canonical(prefix: str, module: str) -> str:
    """The LoraWeights key of `module` (a path in `prefix`'s model): a text encoder's drops transformers' text_model."""
    return f"{prefix}.{module.removeprefix(TEXT_MODEL) if prefix.startswith('text_encoder') else module}"
