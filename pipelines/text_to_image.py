"""Text-to-image (and image-to-image) sampling: prompt -> CLIP embeddings -> guided denoiser -> sampler -> VAE."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from autoencoder.model import AutoencoderKL
from ldm.diffusion.denoiser import CFGDenoiser, DiscreteVPDenoiser, check_interval
from ldm.random import randn
from ldm.diffusion.samplers import SAMPLERS, SamplingPlan
from ldm.diffusion.sampling import FiniteWatch
from ldm.diffusion.schedule import NoiseSchedule
from ldm.networks.text import TextEncoder
from ldm.networks.unet import UNet
from ldm.loading.components import Components, check_components, save_pipeline
from pipelines.images import from_image, to_output
from ldm.loading.sources import load_components

OutputType = Literal["pil", "np", "pt", "latent"]


@dataclass
class PipelineOutput:
    """Generated images (PIL list, numpy (N, H, W, 3) or tensor (N, 3, H, W) in [0, 1], or latents) and seeds."""

    images: Any
    seeds: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (bf16 if the card has it and fp16 is not wanted is a `.to()` away), fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


class Pipeline:
    """A latent text-to-image model: `Pipeline()` is the bundled default model; `Pipeline.from_pretrained(path)`
    reads our folder, a diffusers Stable Diffusion folder or a single-file checkpoint."""

    def __init__(
        self,
        unet: UNet | None = None,
        vae: AutoencoderKL | None = None,
        text_encoder: TextEncoder | None = None,
        schedule: NoiseSchedule | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        """`scheduler_config`: the scheduler_config.json the schedule came from, kept for save_pretrained."""
        given = [c is not None for c in (unet, vae, text_encoder, schedule)]
        if not any(given):
            c = load_components("default")  # the bundled model (ldm.loading.sources.DEFAULT_MODEL)
            unet, vae, text_encoder, schedule = c.unet, c.vae, c.text_encoder, c.schedule
            scheduler_config = c.scheduler_config
        elif not all(given):
            raise ValueError("pass all four components (unet, vae, text_encoder, schedule), or none for the default model")
        assert unet is not None and vae is not None and text_encoder is not None and schedule is not None
        check_components(unet, vae, text_encoder)
        self.unet, self.vae, self.text_encoder, self.schedule = unet.eval(), vae.eval(), text_encoder.eval(), schedule
        self.scheduler_config = scheduler_config
        device = torch.device(device) if device is not None else default_device()
        self.to(device, dtype if dtype is not None else default_dtype(device))

    # ---------------------------------------------------------------------------------------------------------------
    # construction, saving, placement

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        allow_pickle: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        config: str | Path | None = None,
    ) -> Pipeline:
        """Load a pipeline folder (ours or diffusers'), or a single-file SD 1.x/2.x checkpoint; `config` (a pipeline
        folder) gives a single file of another size its configs, as diffusers' from_single_file(config=...)."""
        c = load_components(path, allow_pickle=allow_pickle, config=config)
        return cls(c.unet, c.vae, c.text_encoder, c.schedule, device=device, dtype=dtype,
                   scheduler_config=c.scheduler_config)

    @property
    def components(self) -> Components:
        return Components(self.unet, self.vae, self.text_encoder, self.schedule, self.scheduler_config)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write a safetensors pipeline folder that this class and diffusers' StableDiffusionPipeline both load; the
        scheduler keeps the class and the keys of the folder it was loaded from. It replaces a pipeline folder, a
        folder of anything else only with overwrite=True."""
        save_pipeline(path, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, schedule=self.schedule,
                      scheduler_config=self.scheduler_config, overwrite=overwrite)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move to a device and dtype. In fp16 the VAE stays in fp32 when its config asks (`force_upcast`): the SD
        VAE decoder overflows in fp16."""
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA device here "
                             "(torch.cuda.is_available() is False): use 'cpu', or a machine and torch build with CUDA")
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        self.unet.to(self.device, self.dtype)
        self.text_encoder.to(self.device, self.dtype)
        vae_dtype = torch.float32 if self.dtype == torch.float16 and self.vae.config.force_upcast else self.dtype
        # channels-last convolutions decode 1.2x (fp32) to 2.3x (bf16) faster on the CPU (SD VAE, 256 px, 2 cores);
        # the U-Net stays contiguous, where channels-last is slower in bf16 (benchmarks/speed.py)
        layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.vae.to(self.device, vae_dtype, memory_format=layout)
        return self

    def compile(self, **options: Any) -> Pipeline:
        """torch.compile the U-Net and the VAE decoder in place (nn.Module.compile); `options` go to torch.compile
        (mode="reduce-overhead" for CUDA graphs, "max-autotune", backend=..., dynamic=...). The first call after it
        pays the compile time, again for each new shape (benchmarks/speed.py reports both). Sampling makes no host
        synchronisation per step on an accelerator, so a captured graph covers every network call."""
        self.unet.compile(**options)
        self.vae.decoder.compile(**options)
        return self

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    # ---------------------------------------------------------------------------------------------------------------
    # the pieces of a call

    def check_size(self, height: int, width: int) -> None:
        """Height and width must be positive multiples of the VAE's downsampling factor; the error lists valid ones."""
        f = self.vae_scale_factor
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % f:
                lo, hi = max(f, (int(v) // f) * f), (int(v) // f + 1) * f
                raise ValueError(f"{name}={v} must be a positive multiple of {f} (the VAE factor): e.g. {lo} or {hi}")
        trained = self.unet.config.sample_size * f
        if max(height, width) > 2 * trained or min(height, width) * 2 < trained:
            warnings.warn(f"{height} x {width} is far from the {trained} x {trained} this model was trained at: expect "
                          "images without meaning (and, larger, a run that takes (size / trained size)^2 times "
                          "longer); height and width default to the trained size", stacklevel=4)  # the caller of pipe(...)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, n, D) text embeddings (n: the tokenizer's model_max_length, CLIP's 77)."""
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def denoiser(self, plan: SamplingPlan) -> DiscreteVPDenoiser:
        """The U-Net as D(x, sigma, encoder_hidden_states) for `plan` (VP input scaling, sigma -> t,
        parameterization: SamplingPlan.denoiser). Latents stay fp32 in the sampler; only the network runs in the
        pipeline's dtype."""
        unet, dtype = self.unet, self.dtype

        def net(x_vp: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
            return unet(x_vp.to(dtype), t, **{k: v.to(dtype) for k, v in cond.items()}).float()

        denoiser = plan.denoiser(net)
        # the sigma -> t table on the device, so no step copies a sigma to the host (MPS has no float64: it stays)
        return denoiser if self.device.type == "mps" else denoiser.to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (sigma = 0) -> images in [0, 1], (N, 3, H, W) float32."""
        z = self.vae.unscale_latents(latents.to(self.vae.dtype))
        with torch.no_grad():
            x = self.vae.decode(z)
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str = "dpmpp_2m",
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        image: Any = None,
        strength: float = 0.8,
        output_type: OutputType = "pil",
        progress: bool = True,
        callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
        karras_sigmas: bool | None = None,
        eta: float | None = None,
    ) -> PipelineOutput:
        """Generate images. `prompt` is a string or a list; `image` + `strength` makes it image-to-image.

        Seeds: `seed=s` gives image i the seed s + i, so an image does not depend on the batch it is in; a list gives
        one seed per image; `generator` (one or one per image) overrides both. The returned `seeds` reproduce a run.
        `guidance_interval=(lo, hi)` applies guidance only at noise levels lo < sigma <= hi (Kynkäänniemi et al.
        2024), in the schedule's sigma = sqrt((1 - alphā) / alphā); elsewhere the conditional branch runs alone.
        """
        prompts = _as_prompt_list(prompt)
        negatives = _as_negative_list(negative_prompt, len(prompts))
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}")
        if eta is not None and sampler not in samplers_with_option("eta"):
            raise ValueError(f"sampler {sampler!r} has no eta; samplers that accept eta: {samplers_with_option('eta')}")
        interval = check_interval(guidance_interval)  # refused even at guidance_scale 1, where it is unused
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; valid: pil, np, pt, latent")
        f = self.vae_scale_factor
        init = None
        if image is not None:
            init = from_image(image, height, width)  # (N or 1, 3, H, W) in [-1, 1]
            height, width = int(init.shape[-2]), int(init.shape[-1])
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        self.check_size(height, width)

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        n = len(prompts)
        seeds, generators = _generators(seed, generator, n)
        shape = (n, self.unet.config.in_channels, height // f, width // f)

        spec = SAMPLERS[sampler]  # the function and its schedule facts (which timesteps, final sigma, VP output)
        plan = spec.plan(self.schedule, num_inference_steps, karras=karras_sigmas)  # as its diffusers scheduler
        if init is not None:
            kept, z0 = self._img2img_start(init, n, strength, num_inference_steps)
            plan = plan.last(kept)
        sigmas = plan.sigmas.float().to(self.device)
        noise = latents.to(self.device, torch.float32) if latents is not None else randn(
            shape, generators, device=self.device, dtype=torch.float32)
        if tuple(noise.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for these settings, got {tuple(noise.shape)}")
        if init is not None:
            x = z0 + noise * sigmas[0]  # q(z_t | z_0) in sigma space
        else:
            x = noise * plan.prior_scale  # the prior its diffusers scheduler starts from (init_noise_sigma)

        base = self.denoiser(plan)
        model, cond = self._guided(base, prompts, negatives, guidance_scale, guidance_rescale, interval)
        options: dict[str, Any] = {"cond": cond, "generator": generators}
        if eta is not None:
            options["eta"] = eta
        bar = tqdm(total=len(sigmas) - 1, disable=not progress, desc="sampling", leave=False)

        watch = FiniteWatch() if self.device.type != "cpu" else None  # the CPU checks each step as it goes

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
        out = spec.to_output(out, sigmas[-1].item())  # DDIM with set_alpha_to_one=False ends at sigma > 0, in VP
        if output_type == "latent":
            return PipelineOutput(images=out, seeds=seeds, latents=out)
        return PipelineOutput(images=to_output(self.decode(out), output_type), seeds=seeds, latents=out)

    def _guided(
        self,
        base: DiscreteVPDenoiser,
        prompts: list[str],
        negatives: list[str],
        scale: float,
        rescale: float,
        interval: tuple[float, float] | None,
    ) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """`base` with classifier-free guidance; at scale 1 only the conditional branch is run."""
        cond = {"encoder_hidden_states": self.encode_prompts(prompts)}
        if scale == 1.0 and rescale == 0.0:
            return base, cond
        uncond = {"encoder_hidden_states": self.encode_prompts(negatives)}
        cfg = CFGDenoiser(base, scale, rescale, interval)
        return cfg, {"cond": cond, "uncond": uncond}

    def _img2img_start(
        self, init: torch.Tensor, n: int, strength: float, steps: int
    ) -> tuple[int, torch.Tensor]:
        """(steps kept, z0): encode the image (posterior mode) and keep the last floor(steps * strength) steps, as
        diffusers does (int(steps * strength)); strength = 1 keeps them all and starts from z0 + sigma_max * noise."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        kept = min(int(steps * strength), steps)
        if kept < 1:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run: raise either")
        if init.shape[0] not in (1, n):
            raise ValueError(f"got {init.shape[0]} images for {n} outputs")
        posterior = self.vae.encode(init.to(self.device, self.vae.dtype))
        z0 = self.vae.scale_latents(posterior.mode()).float().expand(n, -1, -1, -1)
        return kept, z0


def samplers_with_option(option: str) -> list[str]:
    """Names in `SAMPLERS` whose function takes the keyword `option` (e.g. "eta"), sorted."""
    return sorted(name for name, spec in SAMPLERS.items() if spec.accepts(option))


def _as_prompt_list(prompt: str | list[str]) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise ValueError("prompt is an empty list: give at least one prompt")
    return list(prompt)


def _as_negative_list(negative: str | list[str] | None, n: int) -> list[str]:
    if negative is None:
        return [""] * n
    negatives = [negative] * n if isinstance(negative, str) else list(negative)
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} prompts")
    return negatives


def _generators(
    seed: int | Sequence[int] | None, generator: torch.Generator | list[torch.Generator] | None, n: int
) -> tuple[list[int], torch.Generator | list[torch.Generator]]:
    """One CPU generator per image (seed + i, or the seeds given), so each image's noise is its own."""
    if generator is not None:
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images")
        return [], generator
    if seed is None:
        seeds = [random.randrange(2**63) for _ in range(n)]
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(n)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images")
    return seeds, [torch.Generator("cpu").manual_seed(s) for s in seeds]
