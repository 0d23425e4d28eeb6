"""Text-guided super-resolution (the Stable Diffusion x4 upscaler's design; cascaded diffusion, Ho et al. 2021):
the low-resolution image, noised to `noise_level` by the low-res schedule, is concatenated to the latents on their
channels at every network call, and the noise level is the U-Net's class label. Same images as diffusers'
StableDiffusionUpscalePipeline on the same weights and generator."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from autoencoder.model import AutoencoderKL
from ldm.diffusion.denoiser import DiscreteVPDenoiser
from ldm.diffusion.process import q_sample
from ldm.diffusion.samplers import SamplingPlan
from ldm.diffusion.schedule import NoiseSchedule
from ldm.loading.sources import upscaler_folder, upscaler_sampling_defaults
from ldm.loading.upscaler import (DEFAULT_MAX_NOISE_LEVEL, UpscalerComponents, check_upscaler_components,
                                  load_upscaler, save_upscaler, upscaler_vae)
from ldm.networks.feature_cache import FeatureCache
from ldm.networks.text import TextEncoder
from ldm.networks.unet import UNet
from ldm.random import randn
from pipelines.call_options import OptionError, check_call_options, check_device, check_dtype, check_int
from pipelines.images import from_image
from pipelines.inpaint import image_start
from pipelines.sampling_run import (OutputType, PipelineOutput, generators, guided_denoiser, initial_noise,
                                    sample_to_output, sampling_plan)
from pipelines.text_to_image import Pipeline, default_device, default_dtype


class Upscaler(Pipeline):
    """A text-guided super-resolution stage: `Upscaler.from_pretrained(folder)` reads a diffusers
    StableDiffusionUpscalePipeline folder (ours or theirs; "default": the bundled model's 64 -> 256 stage),
    `up(prompt, image=low_res)` (or calling it) upscales by the VAE's factor. A Pipeline in all but the call:
    placement, compile, prompts, guidance and decoding are its."""

    def __init__(
        self,
        unet: UNet,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        schedule: NoiseSchedule,
        low_res_schedule: NoiseSchedule,
        *,
        max_noise_level: int = DEFAULT_MAX_NOISE_LEVEL,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scheduler_config: dict[str, Any] | None = None,
        low_res_scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        """`schedule` samples; `low_res_schedule` noises the low-resolution image (diffusers' low_res_scheduler);
        the scheduler configs they came from are kept for save_pretrained."""
        check_upscaler_components(unet, vae, text_encoder, low_res_schedule, max_noise_level)
        self.unet, self.text_encoder, self.schedule = unet.eval(), text_encoder.eval(), schedule
        self.vae = upscaler_vae(vae, "the upscaler's VAE").eval()
        self.low_res_schedule, self.max_noise_level = low_res_schedule, max_noise_level
        self.scheduler_config, self.low_res_scheduler_config = scheduler_config, low_res_scheduler_config
        # what a call naming none of them uses (ldm.loading.sources.upscaler_sampling_defaults): sampler, steps,
        # noise_level, guidance_scale; measured for the bundled stage, diffusers' x4 defaults for other folders
        self.sampling_defaults: dict[str, Any] = upscaler_sampling_defaults("")
        self.memory_check = True
        device = check_device(device) or default_device()
        self.to(device, check_dtype(dtype) or default_dtype(device))

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | Path, *, allow_pickle: bool = False, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Upscaler:
        """Load a StableDiffusionUpscalePipeline folder (ldm.loading.upscaler); "default" is the bundled model's
        64 -> 256 stage (ldm.loading.sources.DEFAULT_UPSCALER), with its measured sampling defaults."""
        folder = upscaler_folder(path)  # an error naming the bundled folder where it is missing
        c = load_upscaler(folder, allow_pickle=allow_pickle)
        up = cls(c.unet, c.vae, c.text_encoder, c.schedule, c.low_res_schedule, max_noise_level=c.max_noise_level,
                 device=device, dtype=dtype, scheduler_config=c.scheduler_config,
                 low_res_scheduler_config=c.low_res_scheduler_config)
        up.sampling_defaults = upscaler_sampling_defaults(folder)
        return up

    @property
    def components(self) -> UpscalerComponents:  # type: ignore[override]
        return UpscalerComponents(self.unet, self.vae, self.text_encoder, self.schedule, self.low_res_schedule,
                                  self.max_noise_level, self.scheduler_config, self.low_res_scheduler_config)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write a safetensors StableDiffusionUpscalePipeline folder that this class and diffusers both load."""
        self.check_no_lora("save_pretrained")  # as Pipeline's: peft's layers would write keys no loader reads
        save_upscaler(path, self.components, overwrite=overwrite)

    def denoiser(self, plan: SamplingPlan, cache: FeatureCache | None = None) -> DiscreteVPDenoiser:
        """D(x, sigma, encoder_hidden_states, image, class_labels): the U-Net on the VP latents with the noised
        low-resolution `image` on their channels (diffusers: scale_model_input, then the concatenation)."""
        unet, dtype = self.unet, self.dtype
        extra = {} if cache is None else {"cache": cache}

        def net(x_vp: torch.Tensor, t: torch.Tensor, *, image: torch.Tensor, class_labels: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            sample = torch.cat([x_vp.to(dtype), image.to(dtype)], dim=1)  # (B, latent + 3, h, w)
            return unet(sample, t, encoder_hidden_states.to(dtype), class_labels=class_labels, **extra).float()

        denoiser = plan.denoiser(net)
        return denoiser if self.device.type == "mps" else denoiser.to(self.device)

    def check_noise_level(self, noise_level: int) -> int:
        """An integer in [0, max_noise_level] that the U-Net has a class embedding for."""
        level = check_int("noise_level", noise_level, 0, self.max_noise_level)
        classes = self.unet.config.num_class_embeds or 0
        if level >= classes:
            raise OptionError("noise_level", level, f"below the U-Net's num_class_embeds ({classes})")
        return level

    def noised_low_res(self, image: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
        """The low-resolution image (N, 3, h, w) in [-1, 1] at `noise_level` of the low-res schedule:
        sqrt(alphā) x + sqrt(1 - alphā) noise (Ho et al. 2020, eq. 4; diffusers' low_res_scheduler.add_noise)."""
        t = torch.full((image.shape[0],), noise_level, dtype=torch.long)
        return q_sample(image, t, self.low_res_schedule.alphas_cumprod().to(image.device), noise)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str],
        image: Any,
        noise_level: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        sampler: str | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        output_type: OutputType = "pil",
        progress: bool = True,
        callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        karras_sigmas: bool | None = None,
        sigma_schedule: str | None = None,
        eta: float | None = None,
        cache_interval: int | None = None,
        cache_depth: int = 0,
        strength: float | None = None,
    ) -> PipelineOutput:
        """Upscale `image` (a PIL image, a list of them, a uint8 (H, W, 3) array or a (N, 3, H, W) tensor in [0, 1]:
        one, or one per prompt) by the VAE's factor, guided by `prompt`. `noise_level` (0 .. max_noise_level): how far
        the low-res image is noised before conditioning (more: the model invents more detail). `strength` in (0, 1]:
        1 starts from the prior (diffusers' upscaler); below 1 the start is the low-res image upsampled (bicubic) and
        encoded, noised to the sigma of the last int(steps * strength) steps, which are run (img2img's start, the
        "hires fix" workflow): the layout and colours come from the image, the stage sharpens.

        The other options are Pipeline's (same names, checks and seeds). `noise_level`, `num_inference_steps`,
        `guidance_scale`, `sampler` and `strength` left None take `self.sampling_defaults`: diffusers' upscaler's
        noise level 20 and guidance 9 with DPM-Solver++(2M) at 30 steps from the prior (strength 1), or the bundled
        stage's measured ones (docs/cascade.md).
        Noise is drawn per image from its generator, the low-res image's noise first, then the latents': with one
        image per prompt this is diffusers' order, so the same generator gives its image (within 1/255 in fp32).
        """
        d = self.sampling_defaults
        sampler = d["sampler"] if sampler is None else sampler
        steps = d["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = d["guidance_scale"] if guidance_scale is None else guidance_scale
        noise_level = d["noise_level"] if noise_level is None else noise_level
        strength = d["strength"] if strength is None else strength
        opts = check_call_options(
            prompt, negative_prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, guidance_interval=guidance_interval, sampler=sampler, seed=seed,
            num_images_per_prompt=num_images_per_prompt, output_type=output_type, sigma_schedule=sigma_schedule,
            karras_sigmas=karras_sigmas, eta=eta, cache_interval=cache_interval, cache_depth=cache_depth,
            callback=callback, strength=strength, img2img=True)
        level = self.check_noise_level(noise_level)
        low = from_image(image)  # (1 or one per prompt, 3, h, w) in [-1, 1]
        if low.shape[0] not in (1, len(opts.prompts)):
            raise ValueError(f"got {low.shape[0]} low-resolution images for {len(opts.prompts)} prompts (give one, "
                             "or one per prompt)")
        prompts = [p for p in opts.prompts for _ in range(opts.num_images_per_prompt)]
        negatives = [n for n in opts.negatives for _ in range(opts.num_images_per_prompt)]
        n, (h, w), f = len(prompts), low.shape[-2:], self.vae_scale_factor
        low = low.expand(n, -1, -1, -1) if low.shape[0] == 1 else low.repeat_interleave(opts.num_images_per_prompt, 0)
        with warnings.catch_warnings():  # steps, cache, memory at the output size; the size warning is ours, below
            warnings.filterwarnings("ignore", message=".* is far from the ")
            self.check_call(opts, h * f, w * f, opts.num_inference_steps or 0)
        trained = self.unet.config.sample_size
        if max(h, w) > 2 * trained or min(h, w) * 2 < trained:
            warnings.warn(f"a {h} x {w} low-resolution image is far from the {trained} x {trained} this upscaler was "
                          "trained at: expect artefacts", stacklevel=2)

        seeds, gens = generators(opts.seeds(), generator, n)
        low_noise = randn(low.shape, gens, device=self.device, dtype=torch.float32)  # diffusers draws it first
        clean, low = low, self.noised_low_res(low.to(self.device), level, low_noise)
        noise = initial_noise(latents, (n, self.vae.config.latent_channels, h, w), gens, self.device)
        spec, plan = sampling_plan(self.schedule, opts)
        # strength < 1: image-to-image's start (pipelines.inpaint.image_start) from the upsampled image
        start = image_start(self.unet, self.vae, upsampled(clean, f), None, n, opts.strength,
                            opts.num_inference_steps or 0, self.device) if opts.strength < 1 else None
        if start is not None:
            plan = plan.last(start.kept)  # the last int(steps * strength) steps
        sigmas = plan.sigmas.float().to(self.device)
        # the prior its diffusers scheduler starts from (init_noise_sigma), or z0 + sigma * noise
        x = start.begin(noise, sigmas[0], plan.prior_scale) if start is not None else noise * plan.prior_scale
        _, model, cond = guided_denoiser(self, plan, opts, prompts, negatives)
        labels = torch.full((n,), level, dtype=torch.long, device=self.device)
        cond = _with_low_res(cond, {"image": low.to(self.dtype), "class_labels": labels})
        return sample_to_output(self, spec, plan, model, x, sigmas, cond, gens, opts, seeds, progress=progress,
                                callback=callback)

    up = __call__


def upsampled(low: torch.Tensor, factor: int) -> torch.Tensor:
    """The init image of a strength < 1 call: the low-res images (N, 3, h, w) in [-1, 1], upsampled by `factor`
    (bicubic) and clamped to [-1, 1] (bicubic overshoots at edges)."""
    return F.interpolate(low.float(), scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def _with_low_res(cond: dict[str, Any], extra: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The denoiser's conditioning (Pipeline._guided's: one dict, or cond / uncond for guidance) with the low-res
    image and its noise level in every branch (the same in both, as diffusers concatenates them)."""
    if set(cond) == {"cond", "uncond"}:
        return {"cond": {**cond["cond"], **extra}, "uncond": {**cond["uncond"], **extra}}
    return {**cond, **extra}
