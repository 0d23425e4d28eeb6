"""Discrete-time Gaussian diffusion (Ho et al. 2020): forward process, posterior, reverse-step Gaussians, ELBO.

Indexing: `alphas_cumprod` is the 1-D tensor (alphā_1, ..., alphā_T) of Ho et al.; array index i holds Ho's step
t = i + 1 (diffusers' convention, timestep 0 is the least noisy). `t` arguments are integer tensors of shape (B,)
holding array indices. Per-example results are (B,); data may have any shape (B, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ldm.diffusion import parameterization as P
from ldm.diffusion.schedule import betas_from_alphas_cumprod  # noqa: F401 - also part of this module's math
from ldm.diffusion.variances import model_log_variance, split_variance
from ldm.random import Generator, randn_like

Variance = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
Decoder = Literal["discretized", "continuous"]


def _check_alphas_cumprod(alphas_cumprod: torch.Tensor) -> None:
    if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 1:
        raise ValueError(f"alphas_cumprod must be a non-empty 1-D tensor, got shape {tuple(alphas_cumprod.shape)}")
    if not bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    if len(alphas_cumprod) > 1 and not bool((alphas_cumprod[1:] < alphas_cumprod[:-1]).all()):
        raise ValueError("alphas_cumprod must be strictly decreasing")


def gather(a: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a[t] shaped (B, 1, ..., 1) to broadcast against `like`, in like's dtype."""
    t = torch.as_tensor(t, device=a.device).long().reshape(-1)
    if bool((t < 0).any()) or bool((t >= len(a)).any()):
        raise ValueError(f"timestep indices must lie in [0, {len(a) - 1}], got {t.tolist()}")
    out = a.to(like.dtype)[t]
    return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = alphā_t / (1 - alphā_t) (Kingma et al. 2021, eq. 2), shape (B,)."""
    ab = alphas_cumprod[torch.as_tensor(t, device=alphas_cumprod.device).long()]
    return ab / (1 - ab)


# ---------------------------------------------------------------------------------------------------------------
# Forward process and posterior
# ---------------------------------------------------------------------------------------------------------------


def q_mean_variance(
    x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and log variance of q(x_t | x0) = N(sqrt(alphā_t) x0, (1 - alphā_t) I) (Ho et al. eq. 4)."""
    ab = gather(alphas_cumprod, t, x0)
    var = (1 - ab).expand_as(x0)
    return ab.sqrt() * x0, var, var.log()


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) noise, a draw of q(x_t | x0) (Ho et al. eq. 4)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
    ab = gather(alphas_cumprod, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def posterior_variances(alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """beta~_t = (1 - alphā_{t-1}) / (1 - alphā_t) beta_t (eq. 7) and its log with beta~_1 := beta~_2 (Ho's code)."""
    _check_alphas_cumprod(alphas_cumprod)
    betas = betas_from_alphas_cumprod(alphas_cumprod)
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    var = betas * (1 - prev) / (1 - alphas_cumprod)
    # beta~_1 = 0: the log is clipped to beta~_2 as in Ho et al.'s code (one step is left as beta_1).
    clipped = torch.cat([var[1:2], var[1:]]) if len(var) > 1 else betas
    return var, clipped.log()


def q_posterior(
    x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean mu~_t, variance beta~_t and clipped log variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
    _check_alphas_cumprod(alphas_cumprod)
    betas = betas_from_alphas_cumprod(alphas_cumprod)
    prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    coef_x0 = betas * prev.sqrt() / (1 - alphas_cumprod)
    coef_xt = (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)
    mean = gather(coef_x0, t, x_t) * x0 + gather(coef_xt, t, x_t) * x_t
    var, log_var = posterior_variances(alphas_cumprod)
    return mean, gather(var, t, x_t).expand_as(x_t), gather(log_var, t, x_t).expand_as(x_t)


class PMeanVariance(NamedTuple):
    """The reverse-step Gaussian p(x_{t-1} | x_t) and the x0 estimate it was built from."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor


def p_mean_variance(
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction: P.Prediction = "epsilon",
    variance: Variance = "fixed_small",
    clip_denoised: bool = False,
) -> PMeanVariance:
    """p(x_{t-1} | x_t) = N(mu~_t(x_t, x0_hat), sigma_t^2) with sigma_t^2 = beta~_t or beta_t (Ho et al. sec. 3.2).

    "fixed_small" uses beta~_t, its log clipped to beta~_2 at t = 1 (beta~_1 = 0) as in Ho et al.'s code;
    "fixed_large" uses beta_t at every t, the decoder t = 1 included (the paper and diffusers' DDPMScheduler;
    Ho et al.'s code puts beta~_2 there).
    "learned_range" / "learned": `output` has 2C channels, the prediction then a variance head read as
    ldm.diffusion.variances.model_log_variance does (Nichol & Dhariwal 2021, eq. 15, between the clipped log beta~_t
    and log beta_t as in their code).
    """
    if variance not in ("fixed_small", "fixed_large", "learned", "learned_range"):
        raise ValueError(f"unknown variance {variance!r}; valid: ['fixed_small', 'fixed_large', 'learned', "
                         "'learned_range']")
    output, head = split_variance(output, x_t.shape[1], variance)
    ab = gather(alphas_cumprod, t, x_t)
    pred_x0 = P.to_x0(prediction, x_t, output, ab)
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1, 1)
    mean, var, log_var = q_posterior(pred_x0, x_t, t, alphas_cumprod)
    if variance == "fixed_large":
        var = gather(betas_from_alphas_cumprod(alphas_cumprod), t, x_t).expand_as(x_t)
        log_var = var.log()
    elif head is not None:
        log_beta = gather(betas_from_alphas_cumprod(alphas_cumprod), t, x_t).log()
        log_var = model_log_variance(variance, head, log_var, log_beta)
        var = log_var.exp()
    return PMeanVariance(mean, var, log_var, pred_x0)


# ---------------------------------------------------------------------------------------------------------------
# Variational bound
# ---------------------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (closed form for Gaussians)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def continuous_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(x; mean, e^{2 log_scale}) in nats, the decoder for real-valued data."""
    z = (x - mean) * torch.exp(-log_scale)
    return -0.5 * z**2 - log_scale - 0.5 * math.log(2 * math.pi)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, *, bits: int = 8
) -> torch.Tensor:
    """Elementwise log of the Gaussian mass on x's bin for `bits`-bit data in [-1, 1] (Ho et al. eq. 13).

    Bins have width 2 / (2^bits - 1) around each level; the outermost bins extend to -inf and +inf.
    """
    if bool((x.abs() > 1 + 1e-6).any()):
        raise ValueError("discretized decoder needs data in [-1, 1]")
    half = 1.0 / (2**bits - 1)
    inv = torch.exp(-log_scale)
    lower = (x - mean - half) * inv
    upper = (x - mean + half) * inv
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper), used at x = -1
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower), used at x = +1
    # log(Phi(u) - Phi(l)) = log Phi(u) + log(1 - Phi(l) / Phi(u)), mirrored when the bin lies above the mean,
    # so that masses far in a tail keep their relative accuracy
    lo, up = torch.where(lower > 0, -upper, lower), torch.where(lower > 0, -lower, upper)
    log_up = torch.special.log_ndtr(up)
    log_mass = log_up + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_up))
    edge = 1 - half  # x at the bottom or top level
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, log_mass))


@dataclass
class VLB:
    """Terms of the negative ELBO L = L_T + sum_{t>1} L_{t-1} + L_0 (Ho et al. eq. 5), per example, in nats.

    `terms[:, i]` is L_i of Ho et al.: i = 0 the decoder NLL -log p(x0 | x_1), i >= 1 the KL
    KL(q(x_i | x_{i+1}, x0) || p(x_i | x_{i+1})). `prior` is L_T = KL(q(x_T | x0) || N(0, I)).
    """

    prior: torch.Tensor  # (B,)
    terms: torch.Tensor  # (B, T)
    dims: int  # data dimensions per example

    @property
    def nll(self) -> torch.Tensor:
        """The bound on -log p(x0) in nats, (B,)."""
        return self.prior + self.terms.sum(1)

    @property
    def elbo(self) -> torch.Tensor:
        """The evidence lower bound on log p(x0) in nats, (B,)."""
        return -self.nll

    @property
    def bpd(self) -> torch.Tensor:
        """The NLL bound in bits per dimension, (B,)."""
        return self.nll / (self.dims * math.log(2))


def vlb_terms(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction: P.Prediction = "epsilon",
    variance: Variance = "fixed_small",
    decoder: Decoder = "discretized",
    clip_denoised: bool = False,
    generator: Generator = None,
) -> VLB:
    """Every term of the variational bound (Ho et al. eq. 5), one q(x_t | x0) draw per term and example.

    `model_fn(x_t, t)` returns the network output of the given `prediction` type for timestep indices t (B,).
    `decoder` is "discretized" (8-bit data in [-1, 1], eq. 13) or "continuous" (a Gaussian density).
    """
    _check_alphas_cumprod(alphas_cumprod)
    if decoder not in ("discretized", "continuous"):
        raise ValueError(f"unknown decoder {decoder!r}; valid: ['discretized', 'continuous']")
    n_steps, batch = len(alphas_cumprod), x0.shape[0]
    ab_last = gather(alphas_cumprod, torch.full((batch,), n_steps - 1), x0)
    zero = torch.zeros_like(x0)
    prior = normal_kl(ab_last.sqrt() * x0, (1 - ab_last).log().expand_as(x0), zero, zero)
    terms = x0.new_zeros(batch, n_steps)
    for i in reversed(range(n_steps)):
        t = torch.full((batch,), i, dtype=torch.long, device=x0.device)
        x_t = q_sample(x0, t, alphas_cumprod, randn_like(x0, generator))
        with torch.no_grad():
            output = model_fn(x_t, t)
        p = p_mean_variance(
            output, x_t, t, alphas_cumprod, prediction=prediction, variance=variance, clip_denoised=clip_denoised
        )
        if i == 0:
            discrete = decoder == "discretized"
            loglik = discretized_gaussian_log_likelihood if discrete else continuous_gaussian_log_likelihood
            terms[:, 0] = -loglik(x0, p.mean, 0.5 * p.log_variance).flatten(1).sum(1)
        else:
            q_mean, _, q_log_var = q_posterior(x0, x_t, t, alphas_cumprod)
            terms[:, i] = normal_kl(q_mean, q_log_var, p.mean, p.log_variance).flatten(1).sum(1)
    return VLB(prior=prior.flatten(1).sum(1), terms=terms, dims=x0[0].numel())
