"""Shared helpers for the schedule/denoiser/sampler tests: an analytic VP epsilon-network and diffusers loops."""

from __future__ import annotations

import torch

from ldm.schedule import Interpolation, t_to_sigma
from ldm.toy import GaussianMixture


def vp_eps_net(gmm: GaussianMixture, train_sigmas: torch.Tensor, interpolation: Interpolation = "linear"):
    """net(x_vp, t) = the exact eps = (x - D(x, sigma(t))) / sigma(t) of the mixture, x = x_vp sqrt(1 + sigma^2)."""
    calls = []

    def net(x_vp: torch.Tensor, t: torch.Tensor, **cond: object) -> torch.Tensor:
        calls.append(1)
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_vp.shape[0])
        sigma = t_to_sigma(t, train_sigmas, interpolation).to(x_vp.dtype)  # (B,)
        s = sigma.reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp * (1 + s**2).sqrt()
        return (x - gmm.denoiser(x, sigma)) / s

    net.calls = calls
    return net


def run_diffusers(scheduler, net, sample: torch.Tensor, num_steps: int, generator=None, **step_kwargs) -> torch.Tensor:
    """The standard diffusers denoising loop (scale_model_input, net, step) from `sample`."""
    scheduler.set_timesteps(num_steps)
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
    return sample
