"""Training losses of discrete-time diffusion: L_simple on the eps / v / x0 target (Ho et al. 2020, eq. 14),
min-SNR-gamma weighting (Hang et al. 2023), a biased distribution of training timesteps, and the variational terms
that train a learned variance: one L_t of L_vlb and L_hybrid (Nichol & Dhariwal 2021, sec. 3.1).

Indexing as in ldm.diffusion.process: `t` holds array indices into `alphas_cumprod`; per-example results are (B,).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ldm.diffusion import parameterization as P
from ldm.diffusion.process import (Decoder, Variance, continuous_gaussian_log_likelihood,
                                   discretized_gaussian_log_likelihood, gather, normal_kl, p_mean_variance,
                                   q_posterior, snr)
from ldm.diffusion.variances import split_variance

HYBRID_LAMBDA = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, sec. 3.1)

Weighting = Literal["simple", "min_snr"]




def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction: P.Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 9): min(SNR, g) for x0, /SNR for eps, /(SNR + 1) for v.

    For eps at SNR = 0 (the last step of a zero-terminal-SNR schedule, Lin et al. 2024) min(SNR, g) / SNR is 0/0; its
    limit SNR -> 0 is 1, the weight diffusers' training scripts set there.
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction == "sample":
        return clipped
    if prediction == "epsilon":
        zero = snr_t == 0
        return torch.where(zero, torch.ones_like(snr_t), clipped / torch.where(zero, torch.ones_like(snr_t), snr_t))
    if prediction == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(P.PREDICTIONS)}")


def diffusion_loss(
    output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction: P.Prediction = "epsilon",
    weighting: Weighting = "simple",
    gamma: float = 5.0,
) -> torch.Tensor:
    """Per-example weighted MSE to the eps / v / x0 target: L_simple (Ho et al. eq. 14) or min-SNR-gamma, (B,)."""
    if output.shape != x0.shape:
        raise ValueError(f"network output shape {tuple(output.shape)} differs from x0 shape {tuple(x0.shape)}")
    ab = gather(alphas_cumprod, t, x0)
    mse = (output - P.target(prediction, x0, noise, ab)).pow(2).flatten(1).mean(1)  # (B,)
    if weighting == "simple":
        return mse
    if weighting == "min_snr":
        return min_snr_weight(snr(t, alphas_cumprod).to(mse), gamma, prediction) * mse
    raise ValueError(f"unknown loss weighting {weighting!r}; valid: ['simple', 'min_snr']")


def timestep_bias_weights(num_timesteps: int, strategy: str = "none", multiplier: float = 1.0, portion: float = 0.25,
                          begin: int = 0, end: int | None = None) -> torch.Tensor:
    """Unnormalised training p(t) over 0..T-1 (diffusers' SDXL-script timestep bias): 1, times `multiplier` on the
    biased timesteps: the last (later) or first (earlier) int(portion * T), or [begin, end) (range), (T,).

    Drawing t ~ w(t) / sum(w) is, in expectation, the uniform-t loss reweighted by T * w(t) / sum(w).
    """
    w = torch.ones(num_timesteps, dtype=torch.float64)
    if strategy == "none":
        return w
    if not 0 <= multiplier < math.inf:
        raise ValueError(f"timestep bias multiplier must be finite and >= 0, got {multiplier}")
    if strategy in ("earlier", "later"):
        if not 0 < portion <= 1:
            raise ValueError(f"timestep bias portion must lie in (0, 1], got {portion}")
        n = int(portion * num_timesteps)
        if n == 0:
            raise ValueError(f"timestep bias portion {portion} of {num_timesteps} timesteps biases none of them")
        biased = slice(0, n) if strategy == "earlier" else slice(num_timesteps - n, num_timesteps)
    elif strategy == "range":
        end = num_timesteps if end is None else end
        if not 0 <= begin < end <= num_timesteps:
            raise ValueError(f"timestep bias range [{begin}, {end}) must lie within [0, {num_timesteps})")
        biased = slice(begin, end)
    else:
        raise ValueError(f"unknown timestep bias strategy {strategy!r}; valid: ['none', 'earlier', 'later', 'range']")
    w[biased] *= multiplier
    if w.sum() == 0:
        raise ValueError("timestep bias leaves no timestep with positive weight (multiplier 0 on all of them)")
    return w


def vlb_term(
    output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction: P.Prediction = "epsilon",
    variance: Variance = "learned_range",
    decoder: Decoder = "continuous",
    stop_mean_gradient: bool = False,
) -> torch.Tensor:
    """L_t of L_vlb in bits per dimension, (B,): KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the decoder's
    -log p(x0 | x_1) at t = 0 (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, eq. 4-6). stop_mean_gradient detaches
    the prediction so that only the variance head learns from it (their L_hybrid). "continuous" decoder: latents."""
    if stop_mean_gradient:
        prediction_part, head = split_variance(output, x_t.shape[1], variance)
        if head is None:
            raise ValueError("stop_mean_gradient leaves nothing to train with a fixed variance; use a learned one")
        output = torch.cat([prediction_part.detach(), head], dim=1)
    p = p_mean_variance(output, x_t, t, alphas_cumprod, prediction=prediction, variance=variance)
    q_mean, _, q_log_var = q_posterior(x0, x_t, t, alphas_cumprod)
    kl = normal_kl(q_mean, q_log_var, p.mean, p.log_variance).flatten(1).mean(1)
    if decoder not in ("discretized", "continuous"):
        raise ValueError(f"unknown decoder {decoder!r}; valid: ['discretized', 'continuous']")
    loglik = discretized_gaussian_log_likelihood if decoder == "discretized" else continuous_gaussian_log_likelihood
    nll = -loglik(x0, p.mean, 0.5 * p.log_variance).flatten(1).mean(1)
    at_zero = torch.as_tensor(t, device=kl.device).reshape(-1) == 0
    return torch.where(at_zero, nll, kl) / math.log(2)


def hybrid_loss(
    output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    prediction: P.Prediction = "epsilon",
    variance: Variance = "learned_range",
    lam: float = HYBRID_LAMBDA,
    weighting: Weighting = "simple",
    gamma: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_hybrid, L_t) per example, (B,) each: L_simple + lambda T L_t with the stop-gradient on the mean in L_t, T L_t
    being the one-sample estimate of L_vlb = sum_t L_t (Nichol & Dhariwal 2021, sec. 3.1; improved-diffusion's
    hybrid loss with T / 1000 rescaling at lambda = 0.001). L_t (bits/dim, no gradient to the mean) is returned too."""
    prediction_part, _ = split_variance(output, x_t.shape[1], variance)
    simple = diffusion_loss(prediction_part, x0, noise, t, alphas_cumprod, prediction=prediction,
                            weighting=weighting, gamma=gamma)
    term = vlb_term(output, x0, x_t, t, alphas_cumprod, prediction=prediction, variance=variance,
                    stop_mean_gradient=True)
    return simple + lam * len(alphas_cumprod) * term, term
