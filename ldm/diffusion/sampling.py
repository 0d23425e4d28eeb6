"""What every sampler shares: the denoiser type, sigma-schedule validation, one checked denoiser call, the ODE slope.

Kept apart from ldm/diffusion/samplers.py and ldm/diffusion/sde.py so that both use one copy (samplers.py imports sde.py's samplers
into its name table).
"""

from __future__ import annotations

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
    """x0_hat = model(x, sigma * ones(B), **cond), with an error naming step i if it is not finite."""
    sigma = float(sigma)
    denoised = model(x, x.new_full((x.shape[0],), sigma), **(cond or {}))
    if denoised.shape != x.shape:
        raise ValueError(f"step {i}: the model returned shape {tuple(denoised.shape)} for input {tuple(x.shape)}")
    if not torch.isfinite(denoised).all():
        raise FloatingPointError(f"step {i} (sigma={sigma:.6g}): the model output contains NaN or inf")
    return denoised


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D(x, sigma)) / sigma, the probability-flow ODE (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma
