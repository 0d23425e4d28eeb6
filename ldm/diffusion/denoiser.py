"""Wrappers turning a network into the one denoiser interface `model(x, sigma, **cond) -> x0_hat` (docs/CONVENTIONS.md).

Sigma space: x = x0 + sigma eps. A VP network sees x_vp = x / sqrt(1 + sigma^2) = sqrt(alphā) x0 + sqrt(1 - alphā) eps
with alphā = 1 / (1 + sigma^2) (Karras et al. 2022, table 1); x0 is the same in both coordinates, and so is eps.

- `DiscreteVPDenoiser`: a network net(x_vp, t, **cond) trained on a discrete schedule (Stable Diffusion's U-Net).
- `ContinuousVPDenoiser`: net(x_vp, t, **cond) with t in [0, 1] on the linear VP SDE (Song et al. 2021).
- `VEDenoiser`: net(x, sigma, **cond) predicting eps, x0 or the score directly.
- `CFGDenoiser`: classifier-free guidance, both branches in one batched call.
- `ClassifierGuidedDenoiser`: D + s sigma^2 grad_x log p(y | x, sigma).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from ldm.diffusion.parameterization import PREDICTIONS, Prediction, to_x0
from ldm.diffusion.sampling import Denoiser
from ldm.diffusion.schedule import Interpolation, Quantize, sigma_to_t
from ldm.diffusion.variances import VarianceHead, check_variance_type, split_variance



def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma (B,) or scalar -> (B, 1, ..., 1) in x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")


def vp_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """c_in = 1 / sqrt(1 + sigma^2): sigma-space x -> VP x_t (Karras et al. 2022, table 1, VP column)."""
    return (1 + sigma**2) ** -0.5


def eps_from_denoised(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """eps_hat = (x - D(x, sigma)) / sigma, the same noise estimate in sigma and in VP coordinates."""
    return (x - denoised) / _bcast(sigma, x)


class DiscreteVPDenoiser(nn.Module):
    """D(x, sigma) = to_x0(net(x / sqrt(1 + sigma^2), t(sigma))) for a network trained on a discrete VP schedule.

    t(sigma) inverts the training sigma table (`ldm.diffusion.schedule.sigma_to_t`): "log" interpolation (k-diffusion, and
    diffusers for Karras sigmas) by default, "linear" to reproduce diffusers' Euler-family timesteps exactly at
    fractional t; both give integer t exactly at table sigmas. quantize=True (or "round") rounds t (diffusers'
    DPM-Solver and UniPC with Karras sigmas pass rounded timesteps to the network), "floor" truncates it (theirs with
    exponential sigmas).
    `variance_type` "learned_range" / "learned": the network returns 2C channels, the prediction and a variance head
    (ldm.diffusion.variances); the call gives x0_hat from the prediction, `with_variance` the head too.
    """

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        train_sigmas: torch.Tensor,
        prediction_type: Prediction = "epsilon",
        interpolation: Interpolation = "log",
        quantize: Quantize = False,
        variance_type: str | None = None,
    ) -> None:
        super().__init__()
        _check_prediction(prediction_type)
        check_variance_type(variance_type)
        self.net, self.variance_type = net, variance_type
        self.register_buffer("train_sigmas", torch.as_tensor(train_sigmas, dtype=torch.float64), persistent=False)
        self.prediction_type = prediction_type
        self.interpolation = interpolation
        self.quantize = quantize

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma, self.train_sigmas, self.interpolation, self.quantize)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.with_variance(x, sigma, **cond)[0]

    def with_variance(self, x: torch.Tensor, sigma: torch.Tensor,
                      **cond: Any) -> tuple[torch.Tensor, VarianceHead | None]:
        """(x0_hat, the network's variance head at t(sigma)), the head None for a fixed-variance network."""
        s = _bcast(sigma, x)  # (B, 1, ..., 1)
        x_vp = x * vp_input_scale(s)
        t = self.sigma_to_t(s.reshape(-1).to(self.train_sigmas.device))  # (B,) float64
        t = t.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
        out, v = split_variance(self.net(x_vp, t, **cond), x.shape[1], self.variance_type)  # (B, C, ...) each
        head = None if v is None else VarianceHead(self.variance_type, v.to(x.dtype), t)
        return to_x0(self.prediction_type, x_vp, out.to(x.dtype), 1 / (1 + s**2)), head


def call_with_variance(model: Denoiser, x: torch.Tensor, sigma: torch.Tensor,
                       **cond: Any) -> tuple[torch.Tensor, VarianceHead | None]:
    """(x0_hat, variance head) from a denoiser that exposes `with_variance` (a learned-variance network or a
    guidance wrapper of one), else (model(x, sigma, **cond), None)."""
    with_variance = getattr(model, "with_variance", None)
    return with_variance(x, sigma, **cond) if with_variance is not None else (model(x, sigma, **cond), None)


class ContinuousVPDenoiser(nn.Module):
    """D(x, sigma) for net(x_vp, t) on the linear VP SDE, beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1],
    alphā(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2) (Song et al. 2021, eq. 33); the network sees
    t * t_scale (e.g. 999 for a network fed DDPM-style timesteps)."""

    def __init__(
        self,
        net: Callable[..., torch.Tensor],
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        prediction_type: Prediction = "epsilon",
        t_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _check_prediction(prediction_type)
        if not 0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.net, self.beta_min, self.beta_max = net, beta_min, beta_max
        self.prediction_type, self.t_scale = prediction_type, t_scale

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = sqrt(1 / alphā(t) - 1)."""
        return torch.expm1(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2).sqrt()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma): the positive root of (beta_d / 2) t^2 + beta_min t - log(1 + sigma^2) = 0."""
        beta_d = self.beta_max - self.beta_min
        return ((self.beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / beta_d

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        s = _bcast(sigma, x)
        x_vp = x * vp_input_scale(s)
        out = self.net(x_vp, self.sigma_to_t(s.reshape(-1)) * self.t_scale, **cond)
        return to_x0(self.prediction_type, x_vp, out.to(x.dtype), 1 / (1 + s**2))


class VEDenoiser(nn.Module):
    """D(x, sigma) for net(x, sigma) in sigma space: eps -> x - sigma eps; sample -> x0; score -> x + sigma^2 score
    (Tweedie; Karras et al. 2022, eq. 3)."""

    def __init__(self, net: Callable[..., torch.Tensor], prediction: Literal["epsilon", "sample", "score"] = "epsilon"):
        super().__init__()
        if prediction not in ("epsilon", "sample", "score"):
            raise ValueError(f"unknown VE prediction {prediction!r}; valid: ['epsilon', 'sample', 'score']")
        self.net, self.prediction = net, prediction

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        s = _bcast(sigma, x)
        out = self.net(x, s.reshape(-1), **cond)
        if self.prediction == "epsilon":
            return x - s * out
        if self.prediction == "score":
            return x + s**2 * out
        return out


def rescale_guidance(eps_cfg: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """phi * eps_cfg * std(eps_cond) / std(eps_cfg) + (1 - phi) * eps_cfg, std per item (Lin et al. 2023, eqs. 15-17;
    diffusers' rescale_noise_cfg, unbiased std)."""
    dims = list(range(1, eps_cfg.ndim))
    ratio = eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
    return phi * eps_cfg * ratio + (1 - phi) * eps_cfg


def check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    """A guidance interval (lo, hi) in sigma with 0 <= lo < hi, as a tuple of floats (None: guide everywhere)."""
    if interval is None:
        return None
    if len(interval) != 2 or not 0.0 <= interval[0] < interval[1]:
        raise ValueError(f"guidance interval must be (lo, hi) in sigma with 0 <= lo < hi, got {interval}")
    return float(interval[0]), float(interval[1])


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): eps_hat = eps(∅) + s (eps(c) - eps(∅)), with optional guidance
    rescale phi computed on eps like diffusers. Called as cfg(x, sigma, cond={...}, uncond={...}); the inner model is
    called ONCE on the batch [uncond; cond] (each kwarg tensor concatenated along dim 0, uncond first).

    `interval=(lo, hi)` guides only where lo < sigma <= hi and is the plain conditional denoiser elsewhere
    (Kynkäänniemi et al. 2024, eq. 2); a step with no item inside runs only the conditional branch.
    With a learned-variance model, `with_variance` guides eps only and passes on the conditional branch's variance
    head (GLIDE, DeepFloyd IF)."""

    def __init__(
        self, model: Denoiser, scale: float, rescale: float = 0.0, interval: tuple[float, float] | None = None
    ) -> None:
        super().__init__()
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.model, self.scale, self.rescale, self.interval = model, scale, rescale, check_interval(interval)

    @staticmethod
    def _join(uncond: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(cond, dict) or not isinstance(uncond, dict):
            raise TypeError("CFGDenoiser needs cond= and uncond= as dicts of keyword arguments for the inner model")
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
        joined = {}
        for k in cond:
            c, u = cond[k], uncond[k]
            if isinstance(c, torch.Tensor):
                if not isinstance(u, torch.Tensor) or c.shape[1:] != u.shape[1:]:
                    raise ValueError(f"cond[{k!r}] and uncond[{k!r}] must be tensors of matching shape")
                joined[k] = torch.cat([u, c])
            elif c == u:
                joined[k] = c
            else:
                raise ValueError(f"non-tensor argument {k!r} differs between cond and uncond")
        return joined

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, *, cond: dict[str, Any], uncond: dict[str, Any]
    ) -> torch.Tensor:
        return self.with_variance(x, sigma, cond=cond, uncond=uncond)[0]

    def with_variance(
        self, x: torch.Tensor, sigma: torch.Tensor, *, cond: dict[str, Any], uncond: dict[str, Any]
    ) -> tuple[torch.Tensor, VarianceHead | None]:
        """(guided x0_hat, the conditional branch's variance head or None)."""
        s = _bcast(sigma, x)
        joined = self._join(uncond, cond)
        inside = torch.ones_like(s, dtype=torch.bool)
        if self.interval is not None:
            inside = (s > self.interval[0]) & (s <= self.interval[1])  # (B, 1, ..., 1)
            if not inside.any():
                return call_with_variance(self.model, x, s.reshape(-1), **cond)
        d, head = call_with_variance(self.model, torch.cat([x, x]), torch.cat([s, s]).reshape(-1), **joined)
        d_u, d_c = d.chunk(2)
        eps_u, eps_c = (x - d_u) / s, (x - d_c) / s
        eps = eps_u + self.scale * (eps_c - eps_u)
        if self.rescale > 0:
            eps = rescale_guidance(eps, eps_c, self.rescale)
        return torch.where(inside, x - s * eps, d_c), None if head is None else head.chunk(2)[1]


class ClassifierGuidedDenoiser(nn.Module):
    """Classifier guidance (Dhariwal & Nichol 2021) in denoiser form: D_guided = D + sigma^2 * s * grad_x log p(y|x),
    since grad log p(x|y) = grad log p(x) + grad log p(y|x) and D = x + sigma^2 grad log p(x) (Tweedie).
    `log_prob(x, sigma, **cond) -> (B,)` is any differentiable classifier on the noisy x in sigma space."""

    def __init__(self, model: Denoiser, log_prob: Callable[..., torch.Tensor], scale: float = 1.0) -> None:
        super().__init__()
        self.model, self.log_prob, self.scale = model, log_prob, scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.with_variance(x, sigma, **cond)[0]

    def with_variance(self, x: torch.Tensor, sigma: torch.Tensor,
                      **cond: Any) -> tuple[torch.Tensor, VarianceHead | None]:
        """(guided x0_hat, the inner model's variance head or None)."""
        s = _bcast(sigma, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            lp = self.log_prob(x_in, s.reshape(-1), **cond)
            if lp.shape != (x.shape[0],):
                raise ValueError(f"log_prob must return shape ({x.shape[0]},), got {tuple(lp.shape)}")
            (grad,) = torch.autograd.grad(lp.sum(), x_in)
        denoised, head = call_with_variance(self.model, x, sigma, **cond)
        return denoised + self.scale * s**2 * grad, head
