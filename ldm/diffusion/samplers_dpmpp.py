"""DPM-Solver++ samplers with noise: the multistep SDE solvers (2M SDE, 3M SDE) and DPM++(2S) ancestral.

Sigma space (docs/CONVENTIONS.md), lambda = -log sigma, h = lambda_next - lambda > 0. The reverse diffusion SDE
solved with DPM-Solver++'s data-prediction exponential integrator (Lu et al. 2022; the SDE variant its authors added to
diffusers' DPMSolverMultistepScheduler as algorithm_type="sde-dpmsolver++") takes, with H = (1 + eta) h,

    x' = (sigma' / sigma) e^(-eta h) x + (1 - e^(-H)) D0 + c1(H) D1 + c2(H) D2 + sigma' sqrt(1 - e^(-2 eta h)) z

where D1 and D2 are the divided differences of the past x0_hat (ldm.diffusion.samplers_dpmpp._differences). eta = 1
is the SDE (diffusers' only choice, and k-diffusion's default), eta = 0 the probability-flow ODE (2M SDE with
eta = 0 is DPM-Solver++(2M), `sample_dpmpp_2m`). Noise: one standard normal of x's shape per step, drawn after the
model call at every step, the last included (diffusers draws it there too and does not use it), from the generator,
so a seeded generator gives diffusers' numbers. k-diffusion draws the same terms from a Brownian tree instead (its
sample_dpmpp_2m_sde / sample_dpmpp_3m_sde): equal in law, not in values.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from ldm.diffusion.sampling import Callback, Denoiser, ancestral_step, check_sigmas, denoise, to_d
from ldm.random import Generator, randn_like

SolverType = Literal["midpoint", "heun"]


def _differences(history: list[torch.Tensor], lambdas: list[float],
                 h: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(D1, D2) from the x0_hat at the last 2 or 3 lambdas (oldest first), h the coming step: D1 = (m0 - m1) / r0
    (Lu et al. 2022, alg. 2) and, with three points, the corrected D1 and the D2 of the DPM-Solver++ code's third-order
    multistep update (diffusers' names)."""
    m0, m1 = history[-1], history[-2]
    r0 = (lambdas[-1] - lambdas[-2]) / h
    d1_0 = (m0 - m1) / r0
    if len(history) < 3:
        return d1_0, None
    r1 = (lambdas[-2] - lambdas[-3]) / h
    d1_1 = (m1 - history[-3]) / r1
    return d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)


@torch.no_grad()
def _multistep_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, Any] | None,
                   generator: Generator, callback: Callback, order: int, eta: float, s_noise: float,
                   solver_type: SolverType, lower_order_final: bool, diffusers_third_order: bool) -> torch.Tensor:
    """The multistep SDE solver of the module docstring, of order `order` after the warm-up steps. Step orders are
    diffusers' (lower_order_final): first order on the first step and on a last step to 0; with fewer than 15
    steps also on any last step, and at most second order on the one before it."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"unknown solver_type {solver_type!r}; valid: midpoint, heun")
    s = check_sigmas(sigmas)
    n = len(s) - 1
    history: list[torch.Tensor] = []  # x0_hat of the last `order` steps, oldest first
    lambdas: list[float] = []
    for i in range(n):
        denoised = denoise(model, x, s[i], cond, i)
        history, lambdas = (history + [denoised])[-order:], (lambdas + [-math.log(s[i])])[-order:]
        noise = randn_like(x, generator) if eta > 0 else None
        few = lower_order_final and n < 15
        p = min(order, len(history), 1 if i == n - 1 and (s[-1] == 0 or few) else order,
                2 if i == n - 2 and few else order)
        if s[i + 1] == 0:
            x = denoised  # lambda' = inf: every coefficient but that of D0 vanishes
        else:
            h = math.log(s[i] / s[i + 1])
            big_h = (1 + eta) * h
            one_minus = -math.expm1(-big_h)  # 1 - e^(-H)
            x = (s[i + 1] / s[i]) * math.exp(-eta * h) * x + one_minus * denoised
            if p >= 2:
                d1, d2 = _differences(history[-p:], lambdas[-p:], h)
                phi_2 = one_minus / -big_h + 1  # (1 - e^(-H)) / (-H) + 1
                if p == 2 and solver_type == "midpoint":
                    x = x + 0.5 * one_minus * d1
                else:
                    x = x + phi_2 * d1
                if d2 is not None:
                    # k-diffusion's -phi_3 = -(phi_2 / H - 1/2); diffusers 0.42 writes
                    # (1 - e^(-H) - H) / H^2 - 1/2 = -phi_3 - 1: an O(h^2) error per step, first order overall
                    x = x + (-(phi_2 / big_h - 0.5) - (1.0 if diffusers_third_order else 0.0)) * d2
            if noise is not None:
                x = x + noise * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0,
    solver_type: SolverType = "midpoint", lower_order_final: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, alg. 2 on the SDE; diffusers' DPMSolverMultistepScheduler with
    algorithm_type="sde-dpmsolver++", k-diffusion's sample_dpmpp_2m_sde): c1 = (1 - e^(-H)) / 2 ("midpoint", both
    defaults) or (1 - e^(-H)) / (-H) + 1 ("heun")."""
    return _multistep_sde(model, x, sigmas, cond, generator, callback, 2, eta, s_noise, solver_type,
                          lower_order_final, False)


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0,
    solver_type: SolverType = "midpoint", lower_order_final: bool = True, diffusers_third_order: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022, third order multistep, SDE form): c1 = phi_2 = (1 - e^(-H))/(-H) + 1,
    c2 = -phi_3 = -(phi_2 / H - 1/2), as k-diffusion's sample_dpmpp_3m_sde (whose second-order warm-up step is
    solver_type="heun"; diffusers' is its config's, "midpoint" by default). diffusers_third_order=True takes
    diffusers' c2 = -phi_3 - 1 (an O(h^2) error per step: first order overall) to reproduce its images."""
    return _multistep_sde(model, x, sigmas, cond, generator, callback, 3, eta, s_noise, solver_type,
                          lower_order_final, diffusers_third_order)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022, alg. 1, r = 1/2) to sigma_down, then fresh noise of std sigma_up
    (`ancestral_step`), as k-diffusion's sample_dpmpp_2s_ancestral: Euler on a step to 0, 2 NFE per other step."""
    s = check_sigmas(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, i)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = x + to_d(x, s[i], denoised) * (down - s[i])
        else:
            h = math.log(s[i] / down)
            mid = s[i] * math.exp(-h / 2)  # the midpoint in lambda = -log sigma
            x_mid = (mid / s[i]) * x - math.expm1(-h / 2) * denoised
            x = (down / s[i]) * x - math.expm1(-h) * denoise(model, x_mid, mid, cond, i)
        if s[i + 1] > 0:
            x = x + randn_like(x, generator) * (s_noise * up)
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x
