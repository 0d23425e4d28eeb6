"""A cascade (Ho et al. 2021): a base text-to-image Pipeline, then a super-resolution stage (Upscaler) conditioned on
its images, with the conditioning augmentation of sampling time: an optional Gaussian blur of the base image and the
upscaler's noise level. One call, one seed: each image's generator draws the base stage's noise, then goes on to
draw the upscaler's, so `seed=s` reproduces the whole cascade."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ldm.diffusion.conditioning_augmentation import gaussian_blur
from pipelines.call_options import check_call_options, check_float
from pipelines.sampling_run import OutputType, PipelineOutput, generators
from pipelines.text_to_image import Pipeline
from pipelines.upscaler import Upscaler

MAX_BLUR_SIGMA = 3.0  # pixels of the base image; CDM trains its 64 -> 256 stage on blur sigmas of about 0.4-0.6


class Cascade:
    """`Cascade()` (the bundled model and its 64 -> 256 stage), `Cascade(base, upscaler)` or
    `Cascade.from_pretrained(upscaler_folder, base="default")`; calling it returns the upscaler's images, latents
    and the seeds that make them again."""

    def __init__(self, base: Pipeline | None = None, upscaler: Upscaler | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """`base` / `upscaler` left None: the bundled model / the bundled stage (pipelines/default_model/upscaler),
        on `device` and `dtype` (the base's where it is given)."""
        if base is None:
            base = Pipeline(device=device, dtype=dtype)
        if upscaler is None and isinstance(base, Pipeline):
            upscaler = Upscaler.from_pretrained("default", device=base.device, dtype=base.dtype)
        if not isinstance(base, Pipeline) or isinstance(base, Upscaler):
            raise TypeError(f"base must be a text-to-image Pipeline, got {type(base).__name__}")
        if not isinstance(upscaler, Upscaler):
            raise TypeError(f"upscaler must be an Upscaler, got {type(upscaler).__name__}")
        self.base, self.upscaler = base, upscaler

    @classmethod
    def from_pretrained(cls, upscaler: str | Path = "default", base: str | Path = "default", *,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Cascade:
        """The base model at `base` and the StableDiffusionUpscalePipeline folder at `upscaler` ("default": the
        bundled model / its bundled stage), on one device and dtype."""
        pipe = Pipeline(device=device, dtype=dtype) if str(base) == "default" else \
            Pipeline.from_pretrained(base, device=device, dtype=dtype)
        return cls(pipe, Upscaler.from_pretrained(upscaler, device=pipe.device, dtype=pipe.dtype))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        negative_prompt: str | list[str] | None = None,
        noise_level: int | None = None,
        blur_sigma: float = 0.0,
        upscale_steps: int | None = None,
        upscale_guidance_scale: float | None = None,
        upscale_sampler: str | None = None,
        upscale_strength: float | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        **base_options: Any,
    ) -> PipelineOutput:
        """Generate with the base Pipeline (`base_options`: its call options, e.g. num_inference_steps,
        guidance_scale, sampler, height, width), blur its images by `blur_sigma` pixels (0: none), and upscale them
        with the prompt at `noise_level` (upscale_steps / upscale_guidance_scale / upscale_sampler: the Upscaler's
        num_inference_steps / guidance_scale / sampler, upscale_strength its strength: below 1 it starts from the base
        image upsampled; None: the upscaler's `sampling_defaults`). The output's
        `latents` are the upscaler's."""
        if "output_type" in base_options or "image" in base_options:
            raise TypeError("the base stage of a cascade makes its images from the prompt (no image=, output_type=)")
        opts = check_call_options(prompt, negative_prompt, seed=seed, num_images_per_prompt=num_images_per_prompt,
                                  output_type=output_type)
        blur = check_float("blur_sigma", blur_sigma, 0.0, MAX_BLUR_SIGMA)
        prompts = [p for p in opts.prompts for _ in range(opts.num_images_per_prompt)]
        negatives = [n for n in opts.negatives for _ in range(opts.num_images_per_prompt)]
        seeds, gens = generators(opts.seeds(), generator, len(prompts))  # one stream per image, both stages
        low = self.base(list(opts.prompts), negative_prompt=list(opts.negatives), generator=gens,
                        num_images_per_prompt=opts.num_images_per_prompt, output_type="pt", progress=progress,
                        **base_options).images  # (N, 3, H, W) in [0, 1]
        if blur > 0:
            low = ((gaussian_blur(low * 2 - 1, blur) + 1) / 2).clamp(0, 1)
        out = self.upscaler(prompts, image=low, negative_prompt=negatives, generator=gens, noise_level=noise_level,
                            num_inference_steps=upscale_steps, guidance_scale=upscale_guidance_scale,
                            sampler=upscale_sampler, strength=upscale_strength,
                            output_type=output_type, progress=progress)
        return PipelineOutput(images=out.images, seeds=seeds, latents=out.latents)
