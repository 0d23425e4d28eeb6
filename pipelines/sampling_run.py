"""What every generation call shares (Pipeline and Upscaler alike): one generator per image, the sampler's plan, the
initial noise, the guided denoiser, and the sampler's run (a progress bar, the finiteness watch, the user's
callback) through to the output."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ldm.diffusion.samplers import SAMPLERS, Sampler, SamplingPlan
from ldm.diffusion.sampling import FiniteWatch
from ldm.networks.feature_cache import FeatureCache
from ldm.random import SEED_SPACE, cpu_generator, randn
from pipelines.call_options import CallOptions
from pipelines.images import to_output

OutputType = Literal["pil", "np", "pt", "latent"]


@dataclass
class PipelineOutput:
    """Generated images (PIL list, numpy (N, H, W, 3) or tensor (N, 3, H, W) in [0, 1], or latents) and seeds."""

    images: Any
    seeds: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None


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


def sampling_plan(schedule: Any, opts: CallOptions) -> tuple[Sampler, SamplingPlan]:
    """The sampler named by the call and its plan on `schedule` (the timesteps its diffusers scheduler walks)."""
    spec = SAMPLERS[opts.sampler or ""]
    return spec, spec.plan(schedule, opts.num_inference_steps or 0, karras=opts.karras_sigmas,
                           sigma_schedule=opts.sigma_schedule)


def initial_noise(latents: torch.Tensor | None, shape: tuple[int, ...],
                  generators: torch.Generator | list[torch.Generator], device: torch.device) -> torch.Tensor:
    """The start's unit noise, fp32 on `device`: the caller's `latents` (of `shape`, else an error naming both), or
    drawn per image from its generator."""
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape} for these settings, got {tuple(latents.shape)}")
    if latents is not None:
        return latents.to(device, torch.float32)
    return randn(shape, generators, device=device, dtype=torch.float32)


def guided_denoiser(pipe: Any, plan: SamplingPlan, opts: CallOptions, prompts: list[str], negatives: list[str],
                    added: Any = None) -> tuple[Any, Callable[..., torch.Tensor], dict[str, Any]]:
    """(base, model, cond): the pipeline's denoiser for `plan` (with DeepCache when the call asks for it, one cache
    per call) and the model the sampler calls, with classifier-free guidance (Pipeline._guided)."""
    cache = FeatureCache(opts.cache_interval, opts.cache_depth)  # one per call: its state lives for this run only
    base = pipe.denoiser(plan, cache if cache.interval > 1 else None)
    model, cond = pipe._guided(base, prompts, negatives, opts.guidance_scale, opts.guidance_rescale,
                               opts.guidance_interval, added, opts.text_options)
    return base, model, cond


def sample_to_output(
    pipe: Any, spec: Sampler, plan: SamplingPlan, model: Callable[..., torch.Tensor], x: torch.Tensor,
    sigmas: torch.Tensor, cond: dict[str, Any], generators: torch.Generator | list[torch.Generator],
    opts: CallOptions, seeds: list[int], *, progress: bool = True,
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> PipelineOutput:
    """Run the sampler (run_sampler, with the call's eta), `finish` the latents (e.g. inpainting's known region),
    and decode them with the pipeline's VAE to the call's output_type ("latent": the latents themselves)."""
    options: dict[str, Any] = {"cond": cond, "generator": generators}
    if opts.eta is not None:
        options["eta"] = opts.eta
    out = run_sampler(spec, plan, model, x, sigmas, options, progress=progress, callback=callback)
    out = finish(out) if finish is not None else out
    if opts.output_type == "latent":
        return PipelineOutput(images=out, seeds=seeds, latents=out)
    return PipelineOutput(images=to_output(pipe.decode(out), opts.output_type), seeds=seeds, latents=out)
