"""Fitting a sigma schedule to a model: the `steps` noise levels that make a sampler land closest to its many-step
solution from the same starts.

A few noise draws, a reference solution with many steps (the same sampler, Karras sigmas), then coordinate descent on
the log-sigma knots: each knot moves by +-delta between its neighbours while the mean squared distance of the final
samples to the reference falls, delta halving when a sweep finds no move. Deterministic (no randomness, a fixed visiting
order), pure torch, ODE samplers (a sampler drawing noise would need its noise frozen). In the spirit of Align Your
Steps (Sabour et al. 2024), which optimises a KL bound instead; here the target is the sampler's own discretisation
error, measured directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ldm.diffusion.samplers import sample
from ldm.diffusion.sampling import Denoiser
from ldm.diffusion.schedule import karras_sigmas


def with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """`sigmas` followed by a final 0."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def optimize_sigmas(
    model: Denoiser, x: torch.Tensor, steps: int, sampler: str = "dpmpp_2m", *, sigma_min: float, sigma_max: float,
    cond: dict[str, Any] | None = None, reference_steps: int = 500, init: torch.Tensor | None = None,
    delta: float = 0.5, min_delta: float = 0.01, max_sweeps: int = 30,
) -> torch.Tensor:
    """The (steps + 1,) float64 sigmas, sigma_max first and 0 last, whose `sampler` run from x (at sigma_max, (B, ...))
    ends closest in mean square to a `reference_steps`-step run (Karras sigmas sigma_max -> sigma_min, then 0). The
    steps - 1 knots in between start at `init` (default Karras sigmas) and stay in [sigma_min, sigma_max), strictly
    decreasing; each sweep tries log sigma +- delta for every knot in turn and keeps what lowers the error, until delta
    falls below min_delta or max_sweeps have run. Cost: reference_steps + ~2 (steps - 1) steps^2 evaluations a sweep."""
    if steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need steps >= 1 and 0 < sigma_min < sigma_max, got {steps}, {sigma_min}, {sigma_max}")
    reference = sample(model, x, with_zero(karras_sigmas(reference_steps, sigma_min, sigma_max)), sampler, cond=cond)
    start = with_zero(karras_sigmas(steps, sigma_min, sigma_max)) if init is None else init.double().clone()
    if len(start) != steps + 1 or not math.isclose(start[0], sigma_max, rel_tol=1e-6) or start[-1] != 0:
        raise ValueError(f"init must have {steps + 1} sigmas from sigma_max={sigma_max} down to 0")
    start[0] = sigma_max
    logs = start[1:-1].log()  # (steps - 1,) the knots

    def error(knots: torch.Tensor) -> float:
        sigmas = with_zero(torch.cat([start[:1], knots.exp()]))
        return (sample(model, x, sigmas, sampler, cond=cond) - reference).pow(2).mean().item()

    best, top, bottom = error(logs), math.log(sigma_max), math.log(sigma_min)
    for _ in range(max_sweeps):
        moved = False
        for i in range(len(logs)):
            upper = logs[i - 1].item() if i > 0 else top
            lower = logs[i + 1].item() if i + 1 < len(logs) else bottom
            for move in (delta, -delta):
                trial, knot = logs.clone(), logs[i].item()
                trial[i] = knot + move
                if not lower < trial[i] < upper:  # halfway to the neighbour (or to sigma_min / sigma_max) instead
                    trial[i] = (knot + (upper if move > 0 else lower)) / 2
                if (candidate := error(trial)) < best:
                    logs, best, moved = trial, candidate, True
                    break
        if not moved:
            delta /= 2
            if delta < min_delta:
                break
    return with_zero(torch.cat([start[:1], logs.exp()]))
