"""Sigma schedules beyond the training table's timesteps: Karras, exponential, SGM-uniform and Align Your Steps.

A sigma schedule names how the (n + 1,) sigmas a sampler walks are placed; each matches what diffusers (or, where
diffusers has no switch, the reference the docstring names) builds on the same scheduler config:

  "default"      the flavor's timesteps on the training table (`ldm.diffusion.schedule.sampler_sigmas`)
  "karras"       sigma_i^(1/rho) linear, rho = 7 (Karras et al. 2022, eq. 5; diffusers' use_karras_sigmas)
  "exponential"  log sigma linear (k-diffusion's get_sigmas_exponential; diffusers' use_exponential_sigmas)
  "sgm_uniform"  timesteps evenly spaced down from T - 1, i.e. diffusers' timestep_spacing="trailing" (Lin et al.
                 2023, table 2): t_k = round(T (1 - k/n)) - 1. Stability's generative-models floor (T - 1)(1 - k/n)
                 (at most 1 apart, equal for n = 10, 20, 25, 50, ...), ComfyUI / A1111 "sgm_uniform" keep it
                 fractional (at most 1.5 apart)
  "ays_sd15",    Align Your Steps (Sabour, Fidler & Kreis 2024, table 3): the published 10-step sigmas of SD 1.5 and
  "ays_sdxl"     SDXL, interpolated log-linearly to other step counts (NVIDIA's AYS how-to page, `loglinear_interp`)

Karras and exponential sigmas span the ends diffusers uses for the flavor (the whole training table for DPM-Solver and
UniPC, the ends of the interpolated timesteps for the Euler family) and keep the flavor's final sigma; SGM-uniform is
the default schedule with trailing spacing; AYS ignores the table and ends at 0 (diffusers' AysSchedules).
`sigma_lookup` gives the sigma -> t lookup diffusers' scheduler feeds the network for each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Literal, get_args

import torch

from ldm.diffusion.schedule import (
    FinalSigma,
    Flavor,
    Interpolation,
    NoiseSchedule,
    Quantize,
    sampler_sigmas,
)

SigmaSchedule = Literal["default", "karras", "exponential", "sgm_uniform", "ays_sd15", "ays_sdxl"]
SIGMA_SCHEDULES: tuple[str, ...] = get_args(SigmaSchedule)

# Sabour, Fidler & Kreis 2024, "Align Your Steps", table 3: sigma(t_10), ..., sigma(t_0) optimised for 10 steps; the
# last knot is the model's sigma_min, where sampling steps to 0 instead (NVIDIA's how-to page, diffusers' AysSchedules)
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "ays_sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "ays_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def check_sigma_schedule(name: str) -> str:
    """`name` if it is a sigma schedule, else a ValueError listing them."""
    if name not in SIGMA_SCHEDULES:
        raise ValueError(f"unknown sigma schedule {name!r}; valid: {', '.join(SIGMA_SCHEDULES)}")
    return name


def resolve_sigma_schedule(schedule: NoiseSchedule, sigma_schedule: str | None = None,
                           karras: bool | None = None) -> str:
    """The schedule a call asks for: `sigma_schedule`; else karras True / False ("karras" / "default", the older
    switch, kept as an alias); else the scheduler config's use_karras_sigmas / use_exponential_sigmas."""
    if sigma_schedule is not None:
        check_sigma_schedule(sigma_schedule)
        if karras is not None and karras != (sigma_schedule == "karras"):
            raise ValueError(f"karras_sigmas={karras} contradicts sigma_schedule={sigma_schedule!r}: give one of them")
        return sigma_schedule
    if karras is not None:
        return "karras" if karras else "default"
    if schedule.use_karras_sigmas:
        return "karras"
    return "exponential" if schedule.use_exponential_sigmas else "default"


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """sigma_i = exp(log sigma_max + i/(n-1) (log sigma_min - log sigma_max)): n values, no final zero (k-diffusion's
    get_sigmas_exponential, diffusers' _convert_to_exponential)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()


def loglinear_interp(knots: Sequence[float], num: int) -> torch.Tensor:
    """`num` values whose logs interpolate linearly those of the decreasing `knots` at evenly spaced positions
    (NVIDIA's AYS how-to, `loglinear_interp`); num = len(knots) returns the knots."""
    logs = torch.tensor(knots, dtype=torch.float64).log()  # (K,)
    pos = torch.linspace(0, len(knots) - 1, num, dtype=torch.float64)
    low = pos.floor().long().clamp(max=len(knots) - 2)
    w = pos - low
    return ((1 - w) * logs[low] + w * logs[low + 1]).exp()


def ays_sigmas(name: str, num_steps: int) -> torch.Tensor:
    """The (num_steps + 1,) Align Your Steps sigmas: the published knots interpolated to num_steps + 1 values, the last
    replaced by 0 (ComfyUI's AlignYourStepsScheduler); 10 steps give the published schedule (diffusers'
    AysSchedules)."""
    if name not in AYS_SIGMAS:
        raise ValueError(f"no Align Your Steps schedule {name!r}; valid: {', '.join(AYS_SIGMAS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigmas = loglinear_interp(AYS_SIGMAS[name], num_steps + 1)
    sigmas[-1] = 0.0
    return sigmas


def table_schedule(schedule: NoiseSchedule, sigma_schedule: str) -> NoiseSchedule:
    """The schedule whose timesteps `sigma_schedule` walks: trailing spacing for "sgm_uniform", else `schedule`."""
    return replace(schedule, timestep_spacing="trailing") if sigma_schedule == "sgm_uniform" else schedule


def schedule_sigmas(schedule: NoiseSchedule, num_steps: int, flavor: Flavor = "euler",
                    sigma_schedule: str = "default", *, final_sigma: FinalSigma | None = None) -> torch.Tensor:
    """The (num_steps + 1,) float64 sigmas of `sigma_schedule` (module docstring) on `schedule` for this flavor."""
    check_sigma_schedule(sigma_schedule)
    if sigma_schedule.startswith("ays_"):
        return ays_sigmas(sigma_schedule, num_steps)
    base = sampler_sigmas(table_schedule(schedule, sigma_schedule), num_steps, flavor,
                          karras=sigma_schedule == "karras", final_sigma=final_sigma)
    if sigma_schedule != "exponential":
        return base
    # the ends diffusers uses, as for Karras sigmas: the whole table (DPM-Solver, UniPC) or the interpolated timesteps
    ends = schedule.sigmas().flip(0) if flavor == "dpmsolver" else base[:-1]
    return torch.cat([exponential_sigmas(num_steps, ends[-1].item(), ends[0].item()), base[-1:]])


def sigma_lookup(sigma_schedule: str, flavor: Flavor) -> tuple[Interpolation, Quantize]:
    """How diffusers' scheduler of this flavor turns these sigmas into the network's timestep: linear interpolation
    for table timesteps; log-linear (its _sigma_to_t) for Karras, exponential and custom (AYS) sigmas, which
    DPM-Solver and UniPC then store as int64: rounded for Karras sigmas, truncated (floor) for exponential ones."""
    check_sigma_schedule(sigma_schedule)
    if sigma_schedule in ("default", "sgm_uniform"):
        return "linear", False
    if flavor == "dpmsolver" and sigma_schedule in ("karras", "exponential"):
        return "log", "round" if sigma_schedule == "karras" else "floor"
    return "log", False

