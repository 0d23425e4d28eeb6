"""Log-likelihoods of a denoiser's model: exact through the probability-flow ODE, and the discrete-time ELBO bound.

The probability-flow ODE in sigma space is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 1 with
Tweedie). With u = log sigma it reads dx/du = f(x, u) = x - D(x, e^u), and the instantaneous change of variables
(Chen et al. 2018; Song et al. 2021, app. D.2) gives
    log p_{sigma_min}(x) = log p_{sigma_max}(x(u_max)) + int_{u_min}^{u_max} div_x f(x(u), u) du.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ldm.diffusion import process as diffusion
from ldm.diffusion import parameterization as P
from ldm.random import Generator, randn_like
from ldm.diffusion.sde import isotropic_normal_log_prob

Divergence = Literal["exact", "hutchinson"]
Probe = Literal["rademacher", "gaussian"]


@dataclass
class LogLikelihood:
    """Per-example log-likelihood (or its lower bound) in nats and the matching bits/dim, both (B,)."""

    log_prob: torch.Tensor
    bpd: torch.Tensor
    prior_log_prob: torch.Tensor | None = None  # PF-ODE: log p_{sigma_max}(x(sigma_max))
    delta: torch.Tensor | None = None  # PF-ODE: the integrated divergence
    nfe: int = 0  # denoiser evaluations
    vlb: diffusion.VLB | None = None  # ELBO: every term of the bound


def bits_per_dim(log_prob: torch.Tensor, dims: int, data_bits: int | None = None) -> torch.Tensor:
    """-log p / (D ln 2), plus log2((2^bits - 1) / 2) when the density is of `data_bits`-bit data scaled to [-1, 1].

    The offset turns a density into the probability of a bin of width 2 / (2^bits - 1) (the x / 127.5 - 1 scaling of
    8-bit images, the bins of Ho et al. eq. 13); score_sde uses bins of 2 / 2^bits, an offset of 7 instead of 6.994.
    """
    bpd = -log_prob / (dims * math.log(2))
    if data_bits is not None:
        bpd = bpd + math.log2((2**data_bits - 1) / 2)
    return bpd


def divergence_exact(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and its exact divergence sum_i d f_i / d x_i by one autograd pass per dimension, (B,)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = fn(x)
        flat = f.flatten(1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, k].sum(), x, retain_graph=True)
            div = div + g.flatten(1)[:, k]
    return f.detach(), div


def divergence_hutchinson(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, probes: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """f(x) and the Hutchinson estimate mean_k z_k^T (df/dx) z_k of its divergence (Hutchinson 1989; FFJORD), (B,)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = fn(x)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k, z in enumerate(probes):
            (g,) = torch.autograd.grad((f * z).sum(), x, retain_graph=k < len(probes) - 1)
            div = div + (g * z).flatten(1).sum(1)
    return f.detach(), div / len(probes)


def _probe(x: torch.Tensor, kind: Probe, generator: Generator) -> torch.Tensor:
    z = randn_like(x, generator)
    if kind == "gaussian":
        return z
    if kind == "rademacher":
        return torch.sign(z) + (z == 0).to(z)  # sign of a normal is a fair coin; 0 has probability 0
    raise ValueError(f"unknown probe {kind!r}; valid: ['rademacher', 'gaussian']")


def pf_ode_log_likelihood(
    model: Callable,
    x: torch.Tensor,
    *,
    sigma_min: float = 1e-3,
    sigma_max: float = 1000.0,
    steps: int = 200,
    divergence: Divergence = "exact",
    probe: Probe = "rademacher",
    n_probes: int = 1,
    prior_log_prob: Callable[[torch.Tensor], torch.Tensor] | None = None,
    data_bits: int | None = None,
    cond: dict | None = None,
    generator: Generator = None,
) -> LogLikelihood:
    """log p_{sigma_min}(x) through the probability-flow ODE (Song et al. 2021, app. D.2), fixed-step RK4 in log sigma.

    Integrates x and div f from sigma_min to sigma_max in `steps` RK4 steps (4 denoiser calls each, run in x's
    dtype: pass float64). The prior is N(0, sigma_max^2 I) unless `prior_log_prob` is given (e.g. N(0, (1 +
    sigma_max^2) I) for a VP model); its error is about |E x| |x(sigma_max)| / sigma_max^2 ~ |E x| / sigma_max nats
    per example, hence the large default. Probes for "hutchinson" are drawn once per call from `generator` and kept
    fixed along the path, so the estimate is unbiased for the same discretisation.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if steps < 1 or n_probes < 1:
        raise ValueError(f"need steps >= 1 and n_probes >= 1, got {steps}, {n_probes}")
    if divergence == "exact":
        div_fn = divergence_exact
    elif divergence == "hutchinson":
        probes = [_probe(x, probe, generator) for _ in range(n_probes)]
        def div_fn(fn: Callable, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return divergence_hutchinson(fn, y, probes)
    else:
        raise ValueError(f"unknown divergence {divergence!r}; valid: ['exact', 'hutchinson']")

    def field(y: torch.Tensor, u: float) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = math.exp(u) * y.new_ones(y.shape[0])
        return div_fn(lambda v: v - model(v, sigma, **(cond or {})), y)

    u0, u1 = math.log(sigma_min), math.log(sigma_max)
    h = (u1 - u0) / steps
    y, delta = x.detach(), x.new_zeros(x.shape[0])
    for n in range(steps):
        u = u0 + n * h
        k1, d1 = field(y, u)
        k2, d2 = field(y + 0.5 * h * k1, u + 0.5 * h)
        k3, d3 = field(y + 0.5 * h * k2, u + 0.5 * h)
        k4, d4 = field(y + h * k3, u + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        delta = delta + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    dims = x[0].numel()
    if prior_log_prob is None:
        prior = isotropic_normal_log_prob(y, sigma_max**2)
    else:
        prior = prior_log_prob(y)
    log_prob = prior + delta
    return LogLikelihood(
        log_prob=log_prob,
        bpd=bits_per_dim(log_prob, dims, data_bits),
        prior_log_prob=prior,
        delta=delta,
        nfe=4 * steps,
    )


def vp_eps_model(
    model: Callable, alphas_cumprod: torch.Tensor, cond: dict | None = None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The epsilon-network view eps(x_t, t) of a sigma-space denoiser: sigma_t = sqrt((1 - alphā_t) / alphā_t),
    x = x_t / sqrt(alphā_t), eps = (x_t - sqrt(alphā_t) D(x, sigma_t)) / sqrt(1 - alphā_t) (docs/CONVENTIONS.md)."""

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alphas_cumprod.to(x_t)[t]  # (B,)
        ab_b = ab.reshape(-1, *([1] * (x_t.ndim - 1)))
        x0_hat = model(x_t / ab_b.sqrt(), ((1 - ab) / ab).sqrt(), **(cond or {}))
        return P.eps_from_x0(x_t, x0_hat, ab_b)

    return eps_model


def elbo_log_likelihood(
    model: Callable,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    decoder: diffusion.Decoder = "discretized",
    variance: diffusion.Variance = "fixed_small",
    cond: dict | None = None,
    generator: Generator = None,
) -> LogLikelihood:
    """Lower bound on log p(x0) by the discrete-time ELBO of Ho et al. (eq. 5), for a sigma-space denoiser.

    With the "discretized" decoder the bound is on the probability of 8-bit data and `bpd` needs no offset.
    """
    vlb = diffusion.vlb_terms(
        vp_eps_model(model, alphas_cumprod, cond), x0, alphas_cumprod,
        prediction="epsilon", variance=variance, decoder=decoder, generator=generator,
    )
    return LogLikelihood(log_prob=vlb.elbo, bpd=vlb.bpd, nfe=len(alphas_cumprod), vlb=vlb)
