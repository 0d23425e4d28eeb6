"""What every sampler shares: the denoiser type, sigma-schedule validation, one checked denoiser call, the ODE slope,
the ancestral step.

Kept apart from ldm/diffusion/samplers.py so that it, sde.py, samplers_multistep.py and samplers_dpmpp.py use one copy
(samplers.py imports their samplers into its name table).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], None] | None


def check_sigmas(sigmas: torch.Tensor) -> list[float]:
    """Validate a sigma schedule (1-D, >= 2 values, finite, >= 0, strictly decreasing); return it as floats."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas contain NaN or inf: {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be >= 0, got min {sigmas.min().item()}")
    if not (sigmas[1:] < sigmas[:-1]).all():
        i = int((sigmas[1:] >= sigmas[:-1]).nonzero()[0])
        raise ValueError(f"sigmas must be strictly decreasing; sigmas[{i}]={sigmas[i].item()} <= sigmas[{i + 1}]")
    return sigmas.tolist()


def denoise(model: Denoiser, x: torch.Tensor, sigma: float | torch.Tensor, cond: dict[str, Any] | None, i: int) -> torch.Tensor:
    """x0_hat = model(x, sigma * ones(B), **cond), with an error naming step i if it is not finite. The finiteness
    check runs here on the CPU only: on an accelerator it would wait for the device at every step (a host
    synchronisation that also stops CUDA graphs), so there the caller checks once at the end (`FiniteWatch`)."""
    sigma = float(sigma)
    denoised = model(x, x.new_full((x.shape[0],), sigma), **(cond or {}))
    if denoised.shape != x.shape:
        raise ValueError(f"step {i}: the model returned shape {tuple(denoised.shape)} for input {tuple(x.shape)}")
    if denoised.device.type == "cpu" and not torch.isfinite(denoised).all():
        raise _not_finite(i, sigma)
    return denoised


def _not_finite(i: int, sigma: float) -> FloatingPointError:
    return FloatingPointError(f"step {i} (sigma={sigma:.6g}): the model output contains NaN or inf")


class FiniteWatch:
    """A sampler callback collecting, without a host synchronisation, whether each step's x0_hat is finite (a flag
    tensor on the device); `check()` then waits once and raises the error `denoise` raises on the CPU, naming the
    first bad step."""

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.sigmas: list[float] = []

    def __call__(self, i: int, sigma: float, x: torch.Tensor, denoised: torch.Tensor) -> None:
        self.flags.append(torch.isfinite(denoised).all())
        self.sigmas.append(float(sigma))

    def check(self) -> None:
        if not self.flags:
            return
        bad = (~torch.stack(self.flags)).nonzero()  # the one host synchronisation
        if len(bad):
            i = int(bad[0])
            raise _not_finite(i, self.sigmas[i])


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D(x, sigma)) / sigma, the probability-flow ODE (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_up = eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2) and
    sigma_down^2 + sigma_up^2 = sigma_next^2: the DDIM step of Song et al. 2021 (eq. 12-16) in sigma space."""
    if sigma_next == 0:
        return 0.0, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up
