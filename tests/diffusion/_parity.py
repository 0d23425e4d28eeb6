"""What the sampler tests compare with: diffusers' scheduler loop on the same analytic model, and a linear test problem
with a closed-form solution for convergence orders."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.integrate import quad

from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.sigma_schedules import exponential_sigmas, sigma_lookup
from ldm.diffusion.toy import mixture_2d, run_diffusers_scheduler, vp_eps_net

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          timestep_spacing="leading", steps_offset=1)


def against_diffusers(name: str, ref_cls: Any, cfg: dict[str, Any], n: int, *, sigma_schedule: str = "default",
                      ref_kwargs: dict[str, Any] | None = None, dtype: torch.dtype = torch.float64,
                      stochastic: bool = False, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') final samples of 32 points of the 2-D mixture: the same start noise, the same network (the
    mixture's exact eps, a function of (x_vp, t)), the same seeded generator. Ours walks SAMPLERS[name].plan on cfg
    and returns in diffusers' coordinates; diffusers' scheduler is ref_cls(**cfg, **ref_kwargs) with the switch of
    `sigma_schedule` (use_karras_sigmas / use_exponential_sigmas). Both make the same number of network calls."""
    spec = SAMPLERS[name]
    plan = spec.plan(NoiseSchedule.from_diffusers(cfg), n, sigma_schedule=sigma_schedule)
    table, gmm = plan.schedule.sigmas(), mixture_2d()
    interpolation = sigma_lookup(sigma_schedule, spec.flavor)[0]  # the network's own t -> sigma, either side
    ref_net, our_net = vp_eps_net(gmm, table, interpolation), vp_eps_net(gmm, table, interpolation)
    switches = {"use_karras_sigmas": sigma_schedule == "karras",
                "use_exponential_sigmas": sigma_schedule == "exponential"}
    scheduler = ref_cls(**cfg, **(ref_kwargs or {}), **switches)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = noise * plan.prior_scale
    gen = (lambda: torch.Generator().manual_seed(1)) if stochastic else (lambda: None)
    ref = run_diffusers_scheduler(scheduler, ref_net, noise if spec.vp_output else x, n, generator=gen())
    out = spec(plan.denoiser(our_net), x, plan.sigmas.to(dtype), generator=gen(), **plan.options, **options)
    assert len(our_net.calls) == len(ref_net.calls) == n
    return spec.to_output(out, float(plan.sigmas[-1])), ref


def f_lambda(lam: float) -> float:
    """x0_hat of the linear test problem as a smooth function of lambda = -log sigma."""
    return math.sin(lam) + 0.5 * lam


SIGMA_MAX, SIGMA_MIN, X_START = 10.0, 0.1, 1.5


def linear_problem_error(name: str, steps: int, *, sde: bool, **options: Any) -> float:
    """|x_N - exact| for D(x, sigma) = f(-log sigma), independent of x, from x = 1.5 at sigma 10 to sigma 0.1 over
    `steps` steps even in log sigma. Then x(lambda) solves dx/dlambda = -k x + k f(lambda), k = 1 for the
    probability-flow ODE and k = 2 for the mean of the reverse SDE (the samplers' s_noise = 0 part), whose solution
    e^(-k(l1 - l0)) x0 + integral of k e^(-k(l1 - l)) f(l) dl is computed by quadrature."""
    k = 2.0 if sde else 1.0
    l0, l1 = -math.log(SIGMA_MAX), -math.log(SIGMA_MIN)
    exact = math.exp(-k * (l1 - l0)) * X_START + quad(lambda lam: k * math.exp(-k * (l1 - lam)) * f_lambda(lam),
                                                      l0, l1, epsabs=1e-12, epsrel=1e-12)[0]
    model = lambda x, sigma, **cond: torch.full_like(x, f_lambda(-math.log(float(sigma[0]))))  # noqa: E731
    x = torch.full((1, 1), X_START, dtype=torch.float64)
    sigmas = exponential_sigmas(steps + 1, SIGMA_MIN, SIGMA_MAX)
    return abs(sample(model, x, sigmas, name, generator=torch.Generator().manual_seed(0), **options).item() - exact)


def order_slope(name: str, *, sde: bool, steps: tuple[int, ...] = (64, 128, 256, 512),
                **options: Any) -> tuple[float, list[float]]:
    """The fitted log-log slope of `linear_problem_error` against the step count, and the errors."""
    errs = [linear_problem_error(name, n, sde=sde, **options) for n in steps]
    return float(np.polyfit(np.log(steps), np.log(errs), 1)[0]), errs
