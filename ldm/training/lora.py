"""LoRA training (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3): each targeted layer
computes W x + (alpha / r) B A x with W frozen and only A (r x in) and B (out x r) trained; B starts at zero, so
training starts from the base model exactly.

The layers are peft's (`peft.LoraConfig` + `peft.inject_adapter_in_model`, the layers diffusers' own LoRA training
uses), injected into our U-Net (and optionally the text encoder) after the frozen parts are written. A run checkpoints
and keeps an EMA of the LoRA layers alone (`lora_modules`: a module sharing them, keyed as peft's
`get_peft_model_state_dict`, `<module path>.lora_A.weight`), so a checkpoint holds the adapter, not the base model;
ldm.training.export's `export_lora` writes it as one shareable file (diffusers/peft or kohya layout).

    lora:
      rank: 4
      alpha: null                 # null: the rank (scale alpha / r = 1)
      unet_targets: [to_q, to_k, to_v, to_out.0]
      text_encoder_targets: []    # e.g. [q_proj, k_proj, v_proj, out_proj]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name of the trained LoRA
LoraInit = Literal["default", "gaussian"]


@dataclass
class LoraConfig:
    """The `lora:` section of a training config: train low-rank adapters instead of the whole U-Net.

    Targets are module-name patterns as peft reads a list: a pattern matches a module whose path is the pattern or
    ends with "." + the pattern (`to_q`, `attn2.to_k`, `to_out.0`, `proj_in`); each must match at least one Linear or
    Conv2d layer. `init`: "default" (peft: A Kaiming-uniform, B zero) or "gaussian" (A ~ N(0, 1/r), B zero)."""

    rank: int = 4
    alpha: float | None = None  # None: the rank, so the update's scale alpha / rank is 1
    dropout: float = 0.0  # on the LoRA branch's input (peft lora_dropout)
    unet_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    text_encoder_targets: list[str] = field(default_factory=list)  # empty: the text encoder stays frozen, no LoRA
    init: LoraInit = "default"
    seed: int = 0  # of the A matrices' random init (the U-Net's; the text encoder's is seed + 1)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0 (or null for the rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if not self.unet_targets:
            raise ValueError("lora.unet_targets is empty: name at least one U-Net layer (e.g. to_q)")
        for what in ("unet_targets", "text_encoder_targets"):
            bad = [t for t in getattr(self, what) if not t or t.startswith(".") or t.endswith(".")]
            if bad:
                raise ValueError(f"lora.{what}: {bad[0]!r} is not a module name pattern")

    @property
    def scale_alpha(self) -> float:
        """alpha (the rank when unset): the update is (alpha / rank) B A."""
        return float(self.alpha if self.alpha is not None else self.rank)


def matched_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """Paths of the Linear / Conv2d modules of `model` that `patterns` name (peft's suffix match); a pattern that
    matches none, or matches a layer of another kind, is a ValueError naming it."""
    found: list[str] = []
    for pattern in patterns:
        hits = [(name, m) for name, m in model.named_modules() if name == pattern or name.endswith("." + pattern)]
        if not hits:
            raise ValueError(f"LoRA target {pattern!r} matches no module of {type(model).__name__}")
        odd = [(name, m) for name, m in hits if not isinstance(m, (nn.Linear, nn.Conv2d))]
        if odd:
            raise ValueError(f"LoRA target {pattern!r} matches {odd[0][0]}, a {type(odd[0][1]).__name__}: only Linear "
                             "and Conv2d layers take a LoRA")
        found += [name for name, _ in hits if name not in found]
    return found


def add_lora(model: nn.Module, config: LoraConfig, patterns: list[str], adapter: str = ADAPTER, *,
             seed: int | None = None) -> list[str]:
    """Inject trainable LoRA layers (peft) into the layers of `model` that `patterns` name, freezing everything else;
    the adapters are float32 whatever the base dtype, initialized from `seed` (None: config.seed). Returns the paths
    of the adapted layers."""
    import peft

    from ldm.random import seeded

    names = matched_modules(model, patterns)
    init = True if config.init == "default" else "gaussian"
    peft_config = peft.LoraConfig(r=config.rank, lora_alpha=config.scale_alpha, lora_dropout=config.dropout,
                                  target_modules=names, init_lora_weights=init)
    model.requires_grad_(False)
    with seeded(config.seed if seed is None else seed):  # the same A in every process and after a resume
        peft.inject_adapter_in_model(peft_config, model, adapter_name=adapter)
    for p in lora_modules(model, adapter).parameters():
        p.data = p.data.float()
        p.requires_grad_(True)
    return names


def lora_modules(model: nn.Module, adapter: str = ADAPTER) -> nn.Module:
    """A module whose parameters and state dict are exactly the LoRA A/B layers in `model` (shared, not copied), keyed
    `<module path>.lora_A.weight` / `.lora_B.weight` as peft's get_peft_model_state_dict: what a LoRA run checkpoints
    and keeps an EMA of. A model without LoRA layers is a ValueError."""
    from peft.tuners.lora import LoraLayer

    root = nn.Module()
    for name, module in model.named_modules():
        if not (isinstance(module, LoraLayer) and adapter in module.lora_A):
            continue
        node = root
        for part in name.split("."):
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.add_module("lora_A", module.lora_A[adapter])
        node.add_module("lora_B", module.lora_B[adapter])
    if not root._modules:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers of adapter {adapter!r}")
    return root


def lora_unet(config: LoraConfig, unet: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Freeze `unet` in `dtype` (the run's mixed-precision dtype, as the frozen parts) and inject float32 LoRA layers
    into lora.unet_targets; returns its LoRA state (lora_modules)."""
    unet.to(dtype)
    add_lora(unet, config, config.unet_targets)
    return lora_modules(unet)


def lora_text(config: LoraConfig, model: nn.Module) -> nn.Module:
    """Inject float32 LoRA layers into lora.text_encoder_targets of a text encoder's (frozen) CLIP model, seeded with
    lora.seed + 1; returns its LoRA state (lora_modules)."""
    add_lora(model, config, config.text_encoder_targets, seed=config.seed + 1)
    return lora_modules(model)
