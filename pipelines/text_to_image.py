"""Text-to-image (and image-to-image) sampling: prompt -> CLIP embeddings -> guided denoiser -> sampler -> VAE."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from autoencoder.model import AutoencoderKL
from ldm.diffusion.denoiser import CFGDenoiser, DiscreteVPDenoiser
from ldm.diffusion.samplers import SamplingPlan
from ldm.diffusion.schedule import NoiseSchedule
from ldm.networks.text import TextEncoder
from ldm.networks.feature_cache import FeatureCache
from ldm.networks.unet import UNet
from ldm.loading.components import Components, check_components, save_pipeline
from pipelines.call_options import (CallOptions, OptionError, check_call_options, check_clip_skip, check_device,
                                    check_dtype, check_int, check_strength_steps)
from pipelines.conditioning import AddedConditions, added_conditions, check_size_conditioning
from pipelines.clip_guidance import check_clip_guidance, clip_guided, model_folder
from pipelines.guidance_options import check_classifier_options, classifier_guided
from pipelines.inpaint import check_inpainting, image_start, init_and_mask
from pipelines.lora import LoraMixin
from pipelines.memory import Estimate, call_bytes, check_fits
from pipelines.sampling_run import (OutputType, PipelineOutput, generators as _generators, guided_denoiser,
                                    initial_noise, sample_to_output, sampling_plan)
from pipelines.vae_precision import run_upcasting
from ldm.loading.sources import load_components, sampling_defaults


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (bf16 is a `.to()` away); on a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX) bf16: the
    networks run in about 0.6x the fp32 time with the bundled model's adherence unchanged within noise (euler 10:
    75% vs 74% mean all-correct, benchmarks/results/defaults-bf16.md against defaults.md), latents and sampler
    arithmetic staying fp32; fp32 on other CPUs, where bf16 is emulated and slower. dtype=torch.float32 gives
    diffusers' fp32 images (within 1/255)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo; False where
    that file is missing, e.g. macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(next((line for line in text.splitlines() if line.startswith("flags")), "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


class Pipeline(LoraMixin):
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
        # the sampler and step count a call without them uses (ldm.loading.sources.sampling_defaults: measured for
        # the bundled model, DPM-Solver++(2M) at 30 steps for others); set it to change them for this pipeline
        self.sampling_defaults: dict[str, Any] = sampling_defaults("default" if not any(given) else "")
        if not any(given):
            c = load_components("default")  # the bundled model (ldm.loading.sources.DEFAULT_MODEL)
            unet, vae, text_encoder, schedule = c.unet, c.vae, c.text_encoder, c.schedule
            scheduler_config = c.scheduler_config
        elif not all(given):
            raise ValueError("pass all four components (unet, vae, text_encoder, schedule), or none for the default model")
        assert unet is not None and vae is not None and text_encoder is not None and schedule is not None
        check_components(unet, vae, text_encoder, schedule)
        self.unet, self.vae, self.text_encoder, self.schedule = unet.eval(), vae.eval(), text_encoder.eval(), schedule
        self.scheduler_config = scheduler_config
        self.model_folder = model_folder("default") if not any(given) else None  # where noisy_clip/ may be
        # refuse a call whose memory estimate exceeds what the device has (pipelines.memory); False skips the check
        self.memory_check = True
        device = check_device(device) or default_device()
        self.to(device, check_dtype(dtype) or default_dtype(device))

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
        pipe = cls(c.unet, c.vae, c.text_encoder, c.schedule, device=device, dtype=dtype,
                   scheduler_config=c.scheduler_config)
        pipe.sampling_defaults = sampling_defaults(path)
        pipe.model_folder = model_folder(path)
        return pipe

    @property
    def components(self) -> Components:
        return Components(self.unet, self.vae, self.text_encoder, self.schedule, self.scheduler_config)

    def save_pretrained(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write a safetensors pipeline folder that this class and diffusers' StableDiffusionPipeline both load; the
        scheduler keeps the class and the keys of the folder it was loaded from. It replaces a pipeline folder, a
        folder of anything else only with overwrite=True. Fused LoRAs are saved merged (pipelines.lora)."""
        with self.plain_layers("save_pretrained"):
            save_pipeline(path, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder, schedule=self.schedule,
                          scheduler_config=self.scheduler_config, overwrite=overwrite)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move to a device and dtype, the VAE too: in fp16 it decodes in fp16 (as diffusers' StableDiffusionPipeline)
        and upcasts itself to fp32 where an output overflows (pipelines.vae_precision). An unavailable device or
        another dtype is an OptionError naming it."""
        device, dtype = check_device(device), check_dtype(dtype)
        self.device = device if device is not None else self.device
        self.dtype = dtype or self.dtype
        self.unet.to(self.device, self.dtype)
        self.text_encoder.to(self.device, self.dtype)
        # channels-last convolutions decode 1.2x (fp32) to 2.3x (bf16) faster on the CPU (SD VAE, 256 px, 2 cores);
        # the U-Net stays contiguous, where channels-last is slower in bf16 (benchmarks/speed.py)
        layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.vae.to(self.device, self.dtype, memory_format=layout)
        return self

    def compile(self, **options: Any) -> Pipeline:
        """torch.compile the U-Net and the VAE decoder in place (nn.Module.compile); `options` go to torch.compile
        (mode="reduce-overhead" for CUDA graphs, "max-autotune", backend=..., dynamic=...). The first call after it
        pays the compile time, again for each new shape (benchmarks/speed.py reports both). Sampling makes no host
        synchronisation per step on an accelerator, so a captured graph covers every network call."""
        FeatureCache.exclude_from_compile()  # cache_interval's bookkeeping stays out of the graphs
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
            v = check_int(name, v, 1)
            if v % f:
                lo, hi = max(f, (v // f) * f), (v // f + 1) * f
                raise OptionError(name, v, f"a positive multiple of {f} (the VAE factor), e.g. {lo} or {hi}")

    def memory_estimate(self, height: int, width: int, batch: int, *, guided: bool = True,
                        img2img: bool = False) -> Estimate:
        """The bytes a call making `batch` images of height x width needs at its peak (pipelines.memory)."""
        return call_bytes(self.unet.config, self.vae.config, batch=batch, height=height, width=width,
                          factor=self.vae_scale_factor, unet_itemsize=self.dtype.itemsize,
                          vae_itemsize=self.vae.dtype.itemsize, guided=guided, img2img=img2img)

    def check_call(self, opts: CallOptions, height: int, width: int, steps: int, *, img2img: bool = False) -> None:
        """What depends on this model, checked before any network runs: the size (a multiple of the VAE factor),
        steps <= the schedule's training steps, cache_depth below the U-Net's skip branches, and the memory estimate
        against what the device has (unless `memory_check` is False)."""
        self.check_size(height, width)
        t = self.schedule.num_train_timesteps
        check_int("num_inference_steps", steps, 1, t, note=" (this schedule's num_train_timesteps)")
        branches = self.unet.cache_branches
        check_int("cache_depth", opts.cache_depth, 0, branches - 1, note=f" (this U-Net has {branches} skip branches)")
        check_clip_skip(opts.clip_skip, self.text_encoder)
        if img2img:
            check_strength_steps(opts.strength, steps)
        if self.memory_check:
            n = opts.num_images
            guided = not (opts.guidance_scale == 1.0 and opts.guidance_rescale == 0.0)
            estimate = self.memory_estimate(height, width, n, guided=guided, img2img=img2img)
            check_fits(estimate.total, self.device, f"height={height}, width={width} with {n} image{'s' * (n > 1)} "
                       "in one call", "lower height, width or the number of images (prompts x "
                       "num_images_per_prompt), or set pipe.memory_check = False to try anyway", estimate.describe())
        trained = self.unet.config.sample_size * self.vae_scale_factor
        if max(height, width) > 2 * trained or min(height, width) * 2 < trained:
            warnings.warn(f"{height} x {width} is far from the {trained} x {trained} this model was trained at: expect "
                          "images without meaning (and, larger, a run that takes (size / trained size)^2 times "
                          "longer); height and width default to the trained size", stacklevel=4)  # the caller of pipe(...)

    def encode_prompts(self, prompts: list[str], **options: Any) -> torch.Tensor:
        """(B, k n, D) text embeddings (n: the tokenizer's model_max_length, CLIP's 77; k windows of it, 1 for prompts
        that fit; `options`: PromptEncoder.encode's, e.g. clip_skip, syntax)."""
        return self.text_encoder.encode(prompts, **options).to(self.device, self.dtype)

    def denoiser(self, plan: SamplingPlan, cache: FeatureCache | None = None) -> DiscreteVPDenoiser:
        """The U-Net as D(x, sigma, encoder_hidden_states) for `plan` (VP input scaling, sigma -> t,
        parameterization: SamplingPlan.denoiser). Latents stay fp32 in the sampler; only the network runs in the
        pipeline's dtype. `cache`: DeepCache over the run (ldm.networks.feature_cache), handed to every U-Net call."""
        unet, dtype = self.unet, self.dtype
        extra = {} if cache is None else {"cache": cache}

        def net(x_vp: torch.Tensor, t: torch.Tensor, concat: torch.Tensor | None = None,
                **cond: torch.Tensor) -> torch.Tensor:
            if concat is not None:  # inpainting U-Nets: [latents, mask, masked-image latents] (pipelines.inpaint)
                x_vp = torch.cat([x_vp, concat.to(x_vp)], 1)
            return unet(x_vp.to(dtype), t, **{k: v.to(dtype) for k, v in cond.items()}, **extra).float()

        denoiser = plan.denoiser(net)
        # the sigma -> t table on the device, so no step copies a sigma to the host (MPS has no float64: it stays)
        return denoiser if self.device.type == "mps" else denoiser.to(self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (sigma = 0) -> images in [0, 1], (N, 3, H, W) float32."""
        with torch.no_grad():
            x = run_upcasting(self.vae, lambda vae: vae.decode(vae.unscale_latents(latents.float()).to(vae.dtype)))
        return (x.float() / 2 + 0.5).clamp(0, 1)

    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        sampler: str | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        output_type: OutputType = "pil",
        progress: bool = True,
        callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
        karras_sigmas: bool | None = None,
        sigma_schedule: str | None = None,
        eta: float | None = None,
        cache_interval: int | None = None,
        cache_depth: int = 0,
        clip_skip: int | None = None,
        prompt_syntax: str = "plain",
        original_size: tuple[int, int] | None = None,  # SDXL's micro-conditioning (pipelines.conditioning)
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,  # the SDXL refiner's (pipelines.conditioning)
        negative_aesthetic_score: float = 2.5,
        classifier: Any = None,  # classifier guidance (pipelines.guidance_options): a NoisyClassifier or its folder
        classifier_scale: float = 1.0,
        label: int | str | Sequence[int | str] | None = None,
        clip_guidance_scale: float = 0.0,  # CLIP guidance (pipelines.clip_guidance): 0 is off
        noisy_clip: Any = None,  # None: the model folder's noisy_clip/; a NoisyCLIP, its folder, or "default"
        clip_prompt: str | Sequence[str] | None = None,  # what h(c) encodes; None: the prompts
    ) -> PipelineOutput:
        """Generate images. `prompt` is a string or a list; `image` + `strength` (default 0.8) makes it image-to-image,
        with `mask_image` inpainting (white repaints, black keeps; strength default 1.0; pipelines.inpaint).

        `sampler` and `num_inference_steps` left None take `self.sampling_defaults`: for the bundled model Euler at
        10 steps (the fewest network evaluations within noise of its best adherence, benchmarks/results/defaults.md),
        for other models DPM-Solver++(2M) at 30 steps.

        Seeds: `seed=s` gives image i the seed s + i, so an image does not depend on the batch it is in; a list gives
        one seed per image; `generator` (one or one per image) overrides both. The returned `seeds` reproduce a run.
        `guidance_interval=(lo, hi)` applies guidance only at noise levels lo < sigma <= hi (Kynkäänniemi et al.
        2024), in the schedule's sigma = sqrt((1 - alphā) / alphā); elsewhere the conditional branch runs alone.
        `sigma_schedule`: where the steps fall (ldm.diffusion.sigma_schedules.SIGMA_SCHEDULES: "default", "karras",
        "exponential", "sgm_uniform", "ays_sd15", "ays_sdxl"); None: the scheduler config's; karras_sigmas=True is
        "karras".
        `cache_interval=N` (> 1) runs the U-Net in full every N-th network call and reuses the deep feature of skip
        branch `cache_depth` in between (DeepCache, Ma et al. 2023; ldm.networks.feature_cache); None or 1: off.
        Prompts past 77 tokens are encoded in 75-token windows; `prompt_syntax="a1111"` reads emphasis, "(word:1.3)",
        "[word]"; `clip_skip=k` reads the text encoder k layers before its last, as diffusers (docs/prompts.md).
        `classifier` + `label` (a class index or name, or one per image) + `classifier_scale`: classifier guidance
        toward the label with a noisy classifier (Dhariwal & Nichol 2021; docs/guidance.md).
        `clip_guidance_scale` > 0: CLIP guidance toward `clip_prompt` (default: the prompts) with a noise-aware CLIP
        (GLIDE; docs/guidance.md); composes with CFG and classifier guidance.

        Every option is checked before anything runs (pipelines.call_options, whose docstring gives the ranges), then
        what depends on the model and the memory estimate (`check_call`); an error names the option, the value and
        the valid range.
        """
        sampler = self.sampling_defaults["sampler"] if sampler is None else sampler
        if num_inference_steps is None:
            num_inference_steps = self.sampling_defaults["num_inference_steps"]
        opts = check_call_options(  # every option, before anything runs (pipelines.call_options)
            prompt, negative_prompt, num_inference_steps, guidance_scale, guidance_rescale, guidance_interval,
            sampler, height, width, seed, num_images_per_prompt, strength, output_type, sigma_schedule, karras_sigmas,
            eta, cache_interval, cache_depth, callback, img2img=image is not None, inpaint=mask_image is not None,
            clip_skip=clip_skip, prompt_syntax=prompt_syntax)
        steps, f = opts.num_inference_steps or 0, self.vae_scale_factor
        init = mask = None
        if image is not None:
            if opts.height is not None and opts.width is not None:  # the image is resized: checked before
                self.check_call(opts, opts.height, opts.width, steps, img2img=True)
            init, mask = init_and_mask(image, mask_image, opts.height, opts.width)  # (N or 1, 3, H, W) in [-1, 1]
            height, width = int(init.shape[-2]), int(init.shape[-1])
        height = self.unet.config.sample_size * f if height is None else height
        width = self.unet.config.sample_size * f if width is None else width
        self.check_call(opts, height, width, steps, img2img=init is not None)  # before any network runs
        check_inpainting(self.unet, self.vae, mask)
        added = added_conditions(self.unet, self.text_encoder, check_size_conditioning(  # SDXL's; None for others
            original_size, crops_coords_top_left, target_size, negative_original_size, negative_crops_coords_top_left,
            negative_target_size, aesthetic_score, negative_aesthetic_score), height, width,
            negative_prompt_given=negative_prompt is not None)

        prompts = [p for p in opts.prompts for _ in range(opts.num_images_per_prompt)]
        negatives = [n for n in opts.negatives for _ in range(opts.num_images_per_prompt)]
        n = len(prompts)
        guide = check_classifier_options(classifier, classifier_scale, label, n, self.vae.config.latent_channels,
                                         self.schedule.num_train_timesteps)
        clip = check_clip_guidance(self, noisy_clip, clip_guidance_scale, clip_prompt, prompts)
        if init is not None and init.shape[0] not in (1, n):
            raise ValueError(f"got {init.shape[0]} init images for {n} outputs (give one, or one per output)")
        seeds, generators = _generators(opts.seeds(), generator, n)
        shape = (n, self.vae.config.latent_channels, height // f, width // f)
        noise = initial_noise(latents, shape, generators, self.device)  # nothing else draws before the sampler
        spec, plan = sampling_plan(self.schedule, opts)  # the sampler and its schedule facts, as diffusers'
        if init is not None:
            start = image_start(self.unet, self.vae, init, mask, n, opts.strength, steps, self.device)
            plan = plan.last(start.kept)  # the last int(steps * strength) steps, as diffusers
        sigmas = plan.sigmas.float().to(self.device)
        # the prior its diffusers scheduler starts from (init_noise_sigma); from an image z0 + sigma n (ImageStart)
        x = start.begin(noise, sigmas[0], plan.prior_scale) if init is not None else noise * plan.prior_scale

        base, model, cond = guided_denoiser(self, plan, opts, prompts, negatives, added)  # DeepCache, CFG
        if init is not None:  # inpainting: the mask conditioning, or the re-noised known region
            model, cond = start.wrap(model, cond, noise, float(plan.sigmas[0]))
        model = classifier_guided(model, base, guide, classifier_scale, self.device)  # None: model itself
        model = clip_guided(model, base, clip, self.text_encoder, self.device)  # None: model itself
        return sample_to_output(self, spec, plan, model, x, sigmas, cond, generators, opts, seeds, progress=progress,
                                callback=callback, finish=start.finish if init is not None else None)  # re-noising

    def _guided(
        self,
        base: DiscreteVPDenoiser,
        prompts: list[str],
        negatives: list[str],
        scale: float,
        rescale: float,
        interval: tuple[float, float] | None,
        added: AddedConditions | None = None,
        text: dict[str, Any] | None = None,
    ) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """`base` with classifier-free guidance; at scale 1 only the conditional branch is run. `added`: SDXL's
        pooled embeddings and micro-conditioning, added to both branches (pipelines.conditioning). `text`: the text
        encoder's options (CallOptions.text_options)."""
        if scale == 1.0 and rescale == 0.0:
            cond = {"encoder_hidden_states": self.encode_prompts(prompts, **(text or {}))}
            if added is not None:
                added.extend(cond, prompts, **(text or {}))
            return base, cond
        c, c_negative = self.text_encoder.encode_pair(prompts, negatives, **(text or {}))
        cond = {"encoder_hidden_states": c.to(self.device, self.dtype)}
        uncond = {"encoder_hidden_states": c_negative.to(self.device, self.dtype)}
        if added is not None:
            added.extend(cond, prompts, uncond, negatives, **(text or {}))
        cfg = CFGDenoiser(base, scale, rescale, interval)
        return cfg, {"cond": cond, "uncond": uncond}

