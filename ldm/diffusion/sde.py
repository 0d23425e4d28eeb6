"""Score SDEs (Song et al. 2021) as objects separate from the network, and the score-based samplers in sigma space.

VPSDE and VESDE give drift, diffusion, marginals and priors in their own time t in [0, 1] and map to the sigma space
of docs/CONVENTIONS.md: a VP state x_vp(t) corresponds to x = x_vp / scale(t) at sigma(t). The samplers take a
denoiser `model(x, sigma, **cond) -> x0_hat`, whose score is (D(x, sigma) - x) / sigma^2 (Tweedie; Karras et al.
2022, eq. 3), and follow the sampler signature of the conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from ldm.random import Generator, randn, randn_like
from ldm.diffusion.sampling import Callback, check_sigmas, denoise



def isotropic_normal_log_prob(z: torch.Tensor, var: float) -> torch.Tensor:
    """log N(z; 0, var I) summed over all but the batch dimension, (B,)."""
    d = z[0].numel()
    return -0.5 * z.flatten(1).pow(2).sum(1) / var - 0.5 * d * math.log(2 * math.pi * var)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim > 0 else v


class VPSDE:
    """dx = -beta(t)/2 x dt + sqrt(beta(t)) dW with beta(t) = beta_min + t (beta_max - beta_min) (Song eq. 11)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min < beta_max:
            raise ValueError(f"VPSDE needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def int_beta(self, t: torch.Tensor) -> torch.Tensor:
        """int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * _bcast(self.beta(t), x) * x

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta(t).sqrt()

    def marginal_mean_std(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_0t(x | x0) = N(e^{-int beta / 2} x0, (1 - e^{-int beta}) I) (Song et al. eq. 29)."""
        ib = self.int_beta(torch.as_tensor(t, dtype=x0.dtype))
        return _bcast(torch.exp(-0.5 * ib), x0) * x0, torch.sqrt(1 - torch.exp(-ib))

    def prior_sample(self, shape: tuple[int, ...], generator: Generator = None, **kw: Any) -> torch.Tensor:
        return randn(shape, generator, **kw)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return isotropic_normal_log_prob(z, 1.0)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma(t) = sqrt(e^{int beta} - 1), so that alphā(t) = 1 / (1 + sigma^2) (docs/CONVENTIONS.md)."""
        return torch.sqrt(torch.expm1(self.int_beta(torch.as_tensor(t, dtype=torch.float64))))

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of `sigma`: the root of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
        log1p = torch.log1p(torch.as_tensor(sigma, dtype=torch.float64) ** 2)
        bd = self.beta_max - self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * bd * log1p)) / bd

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """x_vp = scale(t) * x with scale = 1 / sqrt(1 + sigma(t)^2) = e^{-int beta / 2}."""
        return torch.exp(-0.5 * self.int_beta(torch.as_tensor(t, dtype=torch.float64)))


class VESDE:
    """dx = sqrt(d sigma^2(t)/dt) dW with sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. eq. 9)."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal_mean_std(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p_0t(x | x0) = N(x0, sigma(t)^2 I) (Song et al. eq. 31; the sigma_min^2 at t = 0 is neglected, as there)."""
        return x0, self.sigma(t).to(x0.dtype)

    def prior_sample(self, shape: tuple[int, ...], generator: Generator = None, **kw: Any) -> torch.Tensor:
        return self.sigma_max * randn(shape, generator, **kw)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return isotropic_normal_log_prob(z, self.sigma_max**2)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** torch.as_tensor(t, dtype=torch.float64)

    def t_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.as_tensor(sigma, dtype=torch.float64) / self.sigma_min) / math.log(
            self.sigma_max / self.sigma_min
        )

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# Samplers in sigma space
# ---------------------------------------------------------------------------------------------------------------


def reverse_sde_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise: torch.Tensor | None,
    lam: float,
) -> torch.Tensor:
    """One step sigma -> sigma_next of dx = -(1 + lam^2) sigma score dsigma + lam sqrt(d sigma^2) dW (Karras eq. 6).

    With score = (D - x) / sigma^2 and D held fixed over the step the SDE is linear and is integrated exactly:
    x' = D + r^{1 + lam^2} (x - D) + sigma' sqrt(1 - r^{2 lam^2}) z with r = sigma' / sigma (exponential integrator,
    Zhang & Chen 2022). lam = 0 is DDIM, lam = 1 the DDPM ancestral step; exact for point-mass data at any lam.
    """
    r = sigma_next / sigma
    x_next = denoised + r ** (1 + lam**2) * (x - denoised)
    if lam > 0 and sigma_next > 0:
        x_next = x_next + sigma_next * torch.sqrt(1 - r ** (2 * lam**2)) * noise
    return x_next


@torch.no_grad()
def sample_reverse_sde(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    lam: float = 1.0,
    cond: dict | None = None,
    generator: Generator = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Reverse-time SDE family with reverse-noise level lam >= 0 (lam = 0: probability-flow ODE; Karras eq. 6).

    Every lam has the same marginals p(x; sigma). Discretised by `reverse_sde_step` (exponential integrator with the
    denoiser frozen per step), exact for point-mass data; for Gaussian data exactness would need the data covariance,
    which a denoiser does not expose, so the error there is first order in the step.
    """
    if lam < 0:
        raise ValueError(f"reverse-noise level lam must be >= 0, got {lam}")
    check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        denoised = denoise(model, x, sigmas[i], cond, i)
        noise = randn_like(x, generator) if lam > 0 and sigmas[i + 1] > 0 else None
        x = reverse_sde_step(x, denoised, sigmas[i], sigmas[i + 1], noise, lam)
        if callback is not None:
            callback(i, sigmas[i], x, denoised)
    return x


def langevin_step_size(score: torch.Tensor, noise: torch.Tensor, snr: float) -> torch.Tensor:
    """eps = 2 (snr ||z|| / ||score||)^2 with batch-averaged norms, as score_sde's LangevinCorrector (Song Alg. 4)."""
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    grad_norm = score.flatten(1).norm(dim=1).mean()
    return 2 * (snr * noise_norm / grad_norm) ** 2


@torch.no_grad()
def sample_pc(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    predictor: Literal["euler", "reverse_sde", "none"] = "reverse_sde",
    lam: float = 1.0,
    corrector_steps: int = 1,
    snr: float = 0.16,
    cond: dict | None = None,
    generator: Generator = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2-3): Langevin corrector at sigma_i, then a predictor.

    At each level, `corrector_steps` Langevin steps x += eps score + sqrt(2 eps) z with eps from the target `snr`
    (`langevin_step_size`), then the predictor to sigma_{i+1}: "euler" (probability-flow ODE Euler step),
    "reverse_sde" (`reverse_sde_step` with `lam`) or "none". The corrector-first order follows score_sde's pc_sampler.
    """
    if predictor not in ("euler", "reverse_sde", "none"):
        raise ValueError(f"unknown predictor {predictor!r}; valid: ['euler', 'reverse_sde', 'none']")
    if corrector_steps < 0 or snr <= 0 or lam < 0:
        raise ValueError(f"need corrector_steps >= 0, snr > 0, lam >= 0; got {corrector_steps}, {snr}, {lam}")
    check_sigmas(sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        for _ in range(corrector_steps):
            score = (denoise(model, x, sigma, cond, i) - x) / sigma**2
            z = randn_like(x, generator)
            eps = langevin_step_size(score, z, snr)
            x = x + eps * score + torch.sqrt(2 * eps) * z
        denoised = denoise(model, x, sigma, cond, i)
        if predictor == "euler":
            x = x + (sigma_next - sigma) * (x - denoised) / sigma
        elif predictor == "reverse_sde":
            noise = randn_like(x, generator) if lam > 0 and sigma_next > 0 else None
            x = reverse_sde_step(x, denoised, sigma, sigma_next, noise, lam)
        elif sigma_next == 0:
            x = denoised
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x


@torch.no_grad()
def sample_langevin(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    steps_per_level: int = 100,
    step_size: float = 2e-5,
    cond: dict | None = None,
    generator: Generator = None,
    callback: Callback = None,
) -> torch.Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the positive sigmas.

    At level sigma_i: `steps_per_level` steps x += a_i/2 score + sqrt(a_i) z with a_i = step_size sigma_i^2 / sigma_L^2
    (sigma_L the smallest positive level). If the schedule ends in 0, a final denoising step x = D(x, sigma_L)
    follows (Song & Ermon 2020; Jolicoeur-Martineau et al. 2021). `callback(i, sigma_i, x, D(x, sigma_i))` per level.
    """
    if steps_per_level < 1 or step_size <= 0:
        raise ValueError(f"need steps_per_level >= 1 and step_size > 0, got {steps_per_level}, {step_size}")
    check_sigmas(sigmas)
    levels = sigmas[sigmas > 0]
    sigma_last = levels[-1]
    for i, sigma in enumerate(levels):
        alpha = step_size * (sigma / sigma_last) ** 2
        for _ in range(steps_per_level):
            score = (denoise(model, x, sigma, cond, i) - x) / sigma**2
            x = x + 0.5 * alpha * score + torch.sqrt(alpha) * randn_like(x, generator)
        denoised = denoise(model, x, sigma, cond, i)
        if i == len(levels) - 1 and sigmas[-1] == 0:
            x = denoised
        if callback is not None:
            callback(i, sigma, x, denoised)
    return x
