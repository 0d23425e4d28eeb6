"""What every generation call shares once its denoiser and start are built: one generator per image, and the
sampler's run with a progress bar, the finiteness watch and the user's callback (Pipeline and Upscaler alike)."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.diffusion.samplers import Sampler, SamplingPlan
from ldm.diffusion.sampling import FiniteWatch
from ldm.random import SEED_SPACE, cpu_generator


def generators(
    seeds: list[int] | None, generator: torch.Generator | list[torch.Generator] | None, n: int
) -> tuple[list[int], torch.Generator | list[torch.Generator]]:
    """One CPU generator per image (the seeds given, checked by pipelines.call_options, or random ones;
    ldm.random.cpu_generator draws distinct noise for every 64-bit seed), unless `generator` is given."""
    if generator is not None:
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images")
        return [], generator
    if seeds is None:
        seeds = [random.randrange(SEED_SPACE) for _ in range(n)]
    return seeds, [cpu_generator(s) for s in seeds]


def run_sampler(
    spec: Sampler, plan: SamplingPlan, model: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
    options: dict[str, Any], *, progress: bool = True,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """spec(model, x, sigmas, **options, **plan.options) with a progress bar and `callback` after each step, the
    result in the coordinates its diffusers scheduler returns (`Sampler.to_output`: DDIM with set_alpha_to_one=False
    ends at sigma > 0, in VP). On the CPU each step checks its output as it goes; on an accelerator one host
    synchronisation at the end does (`FiniteWatch`)."""
    bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", leave=False)
    watch = FiniteWatch() if x.device.type != "cpu" else None

    def step(i: int, sigma: float, xi: torch.Tensor, x0: torch.Tensor) -> None:
        bar.update(1)
        if watch is not None:
            watch(i, sigma, xi, x0)
        if callback is not None:
            callback(i, sigma, xi, x0)

    try:
        out = spec(model, x, sigmas, callback=step, **options, **plan.options)
    finally:
        bar.close()
    if watch is not None:
        watch.check()  # one host synchronisation for the whole loop
    return spec.to_output(out, sigmas[-1].item())
