"""Gaussian-mixture data whose noisy marginals, score and optimal denoiser are analytic at every noise level.

Data x0 ~ sum_k w_k N(mu_k, s_k^2 I). Under the variance-exploding corruption x = x0 + sigma * eps the marginal is
p_sigma(x) = sum_k w_k N(x; mu_k, (s_k^2 + sigma^2) I), the score is its log-gradient and Tweedie's formula gives
the optimal denoiser D(x, sigma) = E[x0 | x] = x + sigma^2 * grad log p_sigma(x) (Efron 2011; Karras et al. 2022).
Used as ground truth by the sampler, SDE and likelihood tests and by `benchmarks/samplers.py`, with `vp_eps_net` (the
mixture as a discrete-time eps-network) and `run_diffusers_scheduler` (diffusers' loop, the reference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldm.random import Generator, randn
from ldm.diffusion.schedule import Interpolation, t_to_sigma


class GaussianMixture:
    """An isotropic Gaussian mixture in D dimensions with analytic noisy marginals (float64 by default)."""

    def __init__(
        self,
        weights: Sequence[float],
        means: Sequence[Sequence[float]],
        stds: Sequence[float],
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=dtype)
        self.means = torch.as_tensor(means, dtype=dtype)  # (K, D)
        self.stds = torch.as_tensor(stds, dtype=dtype)  # (K,)
        if self.means.ndim != 2 or self.weights.shape != self.stds.shape or len(self.weights) != len(self.means):
            raise ValueError("weights (K,), means (K, D) and stds (K,) must agree in K")
        if not torch.isclose(self.weights.sum(), torch.ones((), dtype=dtype)):
            raise ValueError(f"mixture weights must sum to 1, got {self.weights.sum().item()}")
        self.dtype = dtype

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: Generator = None, sigma: float = 0.0) -> torch.Tensor:
        """n samples of x0 (sigma = 0) or of the noisy marginal x0 + sigma * eps, shape (n, D)."""
        u = torch.rand(n, generator=generator, dtype=self.dtype)
        k = torch.searchsorted(torch.cumsum(self.weights, 0), u).clamp(max=len(self.weights) - 1)
        std = torch.sqrt(self.stds[k] ** 2 + sigma**2)[:, None]
        return self.means[k] + std * randn((n, self.dim), generator, dtype=self.dtype)

    def _component_log_probs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log(w_k N(x; mu_k, v_k I)) with v_k = s_k^2 + sigma^2: (N, K), and v: (N, K)."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)  # (N or 1, 1)
        var = self.stds[None, :] ** 2 + sigma**2  # (N, K)
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (N, K)
        logn = -0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.log(self.weights)[None] + logn, var

    def log_prob(self, x: torch.Tensor, sigma: float | torch.Tensor = 0.0) -> torch.Tensor:
        """log p_sigma(x) in nats, shape (N,)."""
        lp, _ = self._component_log_probs(x.to(self.dtype), torch.as_tensor(sigma))
        return torch.logsumexp(lp, dim=1)

    def score(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """grad_x log p_sigma(x) = sum_k r_k(x) (mu_k - x) / v_k with responsibilities r_k, shape (N, D)."""
        x64 = x.to(self.dtype)
        lp, var = self._component_log_probs(x64, torch.as_tensor(sigma))
        r = torch.softmax(lp, dim=1)  # (N, K)
        s = ((r / var)[:, :, None] * (self.means[None] - x64[:, None, :])).sum(1)
        return s.to(x.dtype)

    def denoiser(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The optimal denoiser E[x0 | x0 + sigma * eps = x] by Tweedie's formula; the `model(x, sigma)` interface."""
        sigma_t = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return x + sigma_t**2 * self.score(x, sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: object) -> torch.Tensor:
        return self.denoiser(x, sigma)


def mixture_1d() -> GaussianMixture:
    """The 1-D test mixture: two well separated, unequal modes."""
    return GaussianMixture([0.3, 0.7], [[-2.0], [1.5]], [0.3, 0.5])


def mixture_2d() -> GaussianMixture:
    """The 2-D test mixture: three modes of unequal weight and width."""
    return GaussianMixture([0.5, 0.3, 0.2], [[-1.5, 0.0], [1.5, 1.0], [0.5, -1.5]], [0.4, 0.3, 0.25])


def vp_eps_net(gmm: GaussianMixture, train_sigmas: torch.Tensor,
               interpolation: Interpolation = "linear") -> Callable[..., torch.Tensor]:
    """The mixture's exact discrete-time VP eps-network, called like a U-Net: net(x_vp, t) = (x - D(x, sigma(t))) /
    sigma(t) with x = x_vp sqrt(1 + sigma(t)^2) (eps = -sigma grad log p; Song et al. 2021, eq. 32). `net.calls`
    counts the evaluations."""
    calls: list[int] = []

    def net(x_vp: torch.Tensor, t: torch.Tensor, **cond: object) -> torch.Tensor:
        calls.append(1)
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_vp.shape[0])
        sigma = t_to_sigma(t, train_sigmas, interpolation).to(x_vp.dtype)  # (B,)
        s = sigma.reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp * (1 + s**2).sqrt()
        return (x - gmm.denoiser(x, sigma)) / s

    net.calls = calls  # type: ignore[attr-defined]
    return net


def run_diffusers_scheduler(scheduler: Any, net: Callable[..., torch.Tensor], sample: torch.Tensor, num_steps: int,
                            generator: torch.Generator | None = None, **step_kwargs: Any) -> torch.Tensor:
    """diffusers' standard denoising loop (set_timesteps; scale_model_input, net, step) from `sample`: the reference
    our samplers are compared with in the tests and in benchmarks/samplers.py."""
    scheduler.set_timesteps(num_steps)
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
    return sample
