"""Exponential moving average of model parameters (Polyak & Juditsky 1992), with the warm-ups diffusers' EMAModel uses.

After each optimizer step the shadow copy moves towards the parameters: s <- s - (1 - d_k) (s - p), i.e.
s <- d_k s + (1 - d_k) p. The decay d_k of update k (counted from 1) is

    "none"    d_k = decay                                         (the plain EMA)
    "simple"  d_k = min(decay, (1 + n) / (10 + n))                 (diffusers EMAModel, use_ema_warmup=False)
    "power"   d_k = min(decay, 1 - (1 + n / inv_gamma)^-power)     (diffusers EMAModel, use_ema_warmup=True)

with n = k - update_after_step - 1; while n <= 0 the decay is 0 (the shadow copies the parameters), and the warm-up
decays are clamped below at min_decay, exactly as diffusers' `EMAModel.get_decay`.

With update_every = m > 1 the shadow moves only on every m-th step, by the product of the m decays it skipped:
s <- (d_{k-m+1} ... d_k) s + (1 - d_{k-m+1} ... d_k) p_k. That is m plain updates towards p_k, the EMA of every m-th
parameter state with the same time constant (as ema-pytorch's update_every, but keeping the time constant); it
saves m - 1 of every m passes over the weights, and the shadow lags the plain EMA by at most m - 1 steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

Warmup = Literal["none", "simple", "power"]


@dataclass
class EMAConfig:
    """EMA of the trained weights; `enabled: false` trains without one (export then uses the raw weights)."""

    enabled: bool = True
    decay: float = 0.9999
    warmup: Warmup = "simple"
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    update_after_step: int = 0
    update_every: int = 1  # move the shadow every m-th step by the m decays' product (module docstring)

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1], got {self.decay}")
        if not 0.0 <= self.min_decay <= self.decay:
            raise ValueError(f"ema.min_decay must lie in [0, decay], got {self.min_decay}")
        if self.inv_gamma <= 0 or self.power <= 0:
            raise ValueError(f"ema.inv_gamma and ema.power must be > 0, got {self.inv_gamma}, {self.power}")
        if self.update_after_step < 0:
            raise ValueError(f"ema.update_after_step must be >= 0, got {self.update_after_step}")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every must be >= 1, got {self.update_every}")


def ema_decay(num_updates: int, config: EMAConfig) -> float:
    """The decay d_k of update k = num_updates (>= 1), as diffusers' EMAModel.get_decay (module docstring)."""
    n = max(0, num_updates - config.update_after_step - 1)
    if n <= 0:
        return 0.0
    if config.warmup == "none":
        return config.decay
    if config.warmup == "simple":
        value = (1 + n) / (10 + n)
    elif config.warmup == "power":
        value = 1 - (1 + n / config.inv_gamma) ** -config.power
    else:
        raise ValueError(f"unknown EMA warm-up {config.warmup!r}; valid: ['none', 'simple', 'power']")
    return max(min(value, config.decay), config.min_decay)


def ema_update_(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """In place s <- s - (1 - d) (s - p) for every pair (the EMA step, Polyak & Juditsky 1992).

    The same arithmetic and bits as diffusers' EMAModel(foreach=False). A multi-tensor version (three torch._foreach
    ops) gave the same bits but was no faster on CPU (benchmarks/research/ema.py: 12.1 ms a step against 10.1), so the
    loop stays."""
    if len(shadow) != len(params):
        raise ValueError(f"EMA: {len(shadow)} shadow tensors for {len(params)} parameters")
    for s, p in zip(shadow, params):
        s.sub_((1.0 - decay) * (s - p.detach().to(s.dtype)))


class EMA:
    """A shadow copy of a module's parameters (float32 by default) updated with `update(model)` after each step."""

    def __init__(self, model: nn.Module, config: EMAConfig | None = None, *, dtype: torch.dtype | None = torch.float32):
        self.config = config or EMAConfig()
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().clone().to(dtype or p.dtype) for p in model.parameters()]
        self.num_updates = 0
        self.decay = 0.0  # the decay d_k of the latest step
        self.pending = 1.0  # the product of the decays since the shadow last moved (update_every)
        self._stored: list[torch.Tensor] | None = None

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        named = list(model.named_parameters())
        if [n for n, _ in named] != self.names:
            raise ValueError("EMA: the model's parameters differ from the ones this EMA was built for")
        return [p for _, p in named]

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """One EMA step towards `model`'s current parameters (the shadow moves on every update_every-th step);
        returns d_k."""
        self.num_updates += 1
        self.decay = ema_decay(self.num_updates, self.config)
        self.pending *= self.decay
        if self.num_updates % self.config.update_every == 0:
            ema_update_(self.shadow, self._params(model), self.pending)
            self.pending = 1.0
        return self.decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s parameters with the EMA weights (call `store` first to get them back)."""
        for s, p in zip(self.shadow, self._params(model), strict=True):
            p.copy_(s.to(p.dtype))

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of `model`'s current parameters, to be put back by `restore`."""
        self._stored = [p.detach().clone() for p in self._params(model)]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the parameters saved by `store` (e.g. after validating with the EMA weights)."""
        if self._stored is None:
            raise RuntimeError("EMA.restore called without a matching EMA.store")
        for s, p in zip(self._stored, self._params(model), strict=True):
            p.copy_(s)
        self._stored = None

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` holds the EMA weights inside the block (e.g. for validation) and its own again after it, also when
        the block raises: store, copy_to, restore."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = [s.to(device) for s in self.shadow]
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name (for a safetensors file)."""
        return dict(zip(self.names, self.shadow, strict=True))

    def counters(self) -> dict[str, Any]:
        """The state besides the weights (JSON): update count, the latest decay, the pending decay product."""
        return {"num_updates": self.num_updates, "decay": self.decay, "pending": self.pending}

    def state_dict(self) -> dict[str, Any]:
        """Weights by name plus the counters (the weights go to safetensors, the counters to JSON)."""
        return {"weights": self.tensors(), **self.counters()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        missing = [n for n in self.names if n not in weights]
        unexpected = [n for n in weights if n not in self.names]
        if missing or unexpected:
            raise ValueError(f"EMA state: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, s in zip(self.names, self.shadow, strict=True):
            if tuple(weights[name].shape) != tuple(s.shape):
                raise ValueError(f"EMA state {name}: shape {tuple(weights[name].shape)} != {tuple(s.shape)}")
            s.copy_(weights[name])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", 0.0))
        self.pending = float(state.get("pending", 1.0))
