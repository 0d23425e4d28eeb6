"""One training step of latent diffusion (Rombach et al. 2022, sec. 3-4; the loop: ldm.training.unet): z from the frozen
VAE, c from the text encoder with condition dropout, t from uniform / objective.timestep_bias / the vlb importance
sampler, z_t = sqrt(alphā_t) z + sqrt(1 - alphā_t) eps, and the U-Net's loss (L_simple, min-SNR-gamma, L_hybrid /
L_vlb, REPA's alignment). Every draw of sample i comes from its own generator (StepContext.generators)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from autoencoder.model import DiagonalGaussian  # a layer down (tests/test_imports.py)
from ldm.config import ConfigError
from ldm.diffusion.losses import diffusion_loss, timestep_bias_weights
from ldm.diffusion.process import q_sample
from ldm.loading.components import Components
from ldm.random import randn
from ldm.training.config import TrainConfig
from ldm.training.loop import StepContext
from ldm.training.repa import Aligner, alignment_loss, captured
from ldm.training.super_resolution import LowResConditioning
from ldm.training.variance_objective import VarianceObjective


def timestep_weights(config: TrainConfig, num_timesteps: int) -> torch.Tensor | None:
    """objective.timestep_bias's p(t) over the schedule's timesteps (None: uniform), or a ConfigError naming it."""
    bias = config.objective.timestep_bias
    if bias.strategy == "none":
        return None
    try:
        return timestep_bias_weights(num_timesteps, bias.strategy, bias.multiplier, bias.portion, bias.begin, bias.end)
    except ValueError as e:
        raise ConfigError(f"objective.timestep_bias: {e}") from None


def dropout_mask(generators: list[torch.Generator], p: float) -> torch.Tensor:
    """Bernoulli(p) per sample, one uniform draw from each sample's generator: True = caption becomes ""."""
    return torch.stack([torch.rand((), generator=g) < p for g in generators]) if generators else torch.zeros(0, dtype=bool)


class DiffusionStep:
    """The per-micro-batch loss of latent diffusion (module docstring); holds the frozen VAE, the text encoder
    (`text`: the prepared module when it is trained, else parts.text_encoder), the optional REPA `aligner` and the
    per-record caches (latent moments, alignment targets). Once the caches hold every record of `dataset` (a
    map-style ldm.training.data.CaptionedImages), it stops the dataset decoding images."""

    def __init__(self, config: TrainConfig, parts: Components, unet: torch.nn.Module, device: torch.device,
                 dtype: torch.dtype, text: torch.nn.Module | None = None,
                 t_weights: torch.Tensor | None = None, dataset: Any = None, aligner: Aligner | None = None) -> None:
        self.config, self.unet, self.device, self.dtype = config, unet, device, dtype
        self.vae, self.text = parts.vae, parts.text_encoder if text is None else text
        self.text_trained = text is not None  # train_text_encoder, or a text-encoder LoRA
        self.alphas_cumprod = parts.schedule.alphas_cumprod().to(device)
        self.prediction = parts.schedule.prediction_type
        self.cache: dict[int, torch.Tensor] = {}  # record -> q(z|x)'s moments
        self.target_cache: dict[int, torch.Tensor] = {}  # record -> REPA target features
        self.aligner = aligner
        self.t_weights = t_weights  # None: uniform t (train's timestep_weights)
        obj, n_t = config.objective, len(self.alphas_cumprod)  # loss hybrid / vlb: ldm.training.variance_objective
        self.variance_objective = None if obj.loss == "simple" else VarianceObjective(
            obj.loss, obj.variance, n_t, lam=obj.hybrid_lambda, min_snr_gamma=obj.min_snr_gamma)
        self.dataset = dataset if hasattr(dataset, "images") else None
        sr = config.super_resolution  # the low-res input on the latents' channels (ldm.training.super_resolution)
        self.low_res = LowResConditioning(sr, device) if sr is not None else None
        if config.run.cache_latents:  # one image at a time: a cached moment must not depend on its batch-mates
            self.vae.enable_slicing()

    def timesteps(self, gens: list[torch.Generator]) -> torch.Tensor:
        """One t per example from its generator: uniform on 0..T-1, or from objective.timestep_bias's p(t)."""
        if self.variance_objective is not None and (t := self.variance_objective.timesteps(gens)) is not None:
            return t  # importance-sampled (objective.loss=vlb)
        if self.t_weights is None:
            return torch.cat([torch.randint(0, len(self.alphas_cumprod), (1,), generator=g) for g in gens])
        return torch.cat([torch.multinomial(self.t_weights, 1, generator=g) for g in gens])

    def state_dict(self) -> dict[str, Any]:
        """What checkpoints keep of the step (objective.loss=vlb's importance sampler), JSON-ready; {}: nothing."""
        return {} if self.variance_objective is None else self.variance_objective.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.variance_objective is not None:
            self.variance_objective.load_state_dict(state)

    def per_record(self, batch: dict[str, Any], cache: dict[int, torch.Tensor],
                   compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """compute(pixels) for the batch, or its rows from `cache` (filled here when run.cache_latents)."""
        indices = batch["indices"].tolist()
        if self.config.run.cache_latents and all(i in cache for i in indices):
            return torch.stack([cache[i] for i in indices]).to(self.device)
        if "pixel_values" not in batch:
            missing = [i for i in indices if i not in cache]
            raise RuntimeError(f"a batch without images, but records {missing[:5]} have nothing cached")
        values = compute(batch["pixel_values"].to(self.device, self.dtype))  # from (B, 3, H, W)
        if self.config.run.cache_latents:
            cache.update({i: v.cpu() for i, v in zip(indices, values, strict=True)})
            caches = [self.cache] + ([self.target_cache] if self.aligner is not None else [])
            if self.dataset is not None and all(len(c) == len(self.dataset) for c in caches):
                self.dataset.images = False  # every record is cached: stop opening images
        return values

    @torch.no_grad()
    def latents(self, batch: dict[str, Any], gens: list[torch.Generator]) -> torch.Tensor:
        """z = scaling * (z ~ q(z|x)) for the batch, moments cached per record when run.cache_latents."""
        moments = self.per_record(batch, self.cache, lambda x: self.vae.encode(x).parameters)  # (B, 2C, h, w)
        return self.vae.scale_latents(DiagonalGaussian(moments).sample(gens)).float()  # (B, C, h, w)

    def alignment_targets(self, pixels: torch.Tensor) -> torch.Tensor:
        """REPA's target features; one image at a time when cached, so a cached row does not depend on its batch."""
        if not self.config.run.cache_latents:
            return self.aligner.features(pixels)
        return torch.cat([self.aligner.features(x[None]) for x in pixels])

    def __call__(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        obj = self.config.objective
        captions = list(batch["captions"])
        n = len(captions)  # >= 1: ldm.training.loop.run_loop handles micro-batches with no readable image
        gens = ctx.generators(n)
        drop = dropout_mask(gens, obj.condition_dropout)
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        z = self.latents(batch, gens)
        with contextlib.nullcontext() if self.text_trained else torch.no_grad():
            c = self.text(captions).to(self.dtype)  # (B, n, D); forward = encode (through DDP when wrapped)
        t = self.timesteps(gens).to(self.device)  # (B,)
        noise = randn(z.shape, gens, device=self.device)
        if obj.noise_offset > 0:
            noise = noise + obj.noise_offset * randn((n, z.shape[1], 1, 1), gens, device=self.device)
        z_t = q_sample(z, t, self.alphas_cumprod, noise)
        with captured(self.aligner.block) if self.aligner else contextlib.nullcontext() as seen:
            x, low_res = (z_t, {}) if self.low_res is None else self.low_res(batch, gens, z_t)  # + class_labels
            out = self.unet(x, t, encoder_hidden_states=c, **low_res).float()
        weighting = "min_snr" if obj.min_snr_gamma is not None else "simple"
        logs = {"dropped": float(drop.float().mean())}
        if self.variance_objective is not None:
            loss, extra = self.variance_objective(out, z, noise, z_t, t, self.alphas_cumprod, self.prediction)
            loss = loss.mean()
            logs.update(extra)
        else:
            loss = diffusion_loss(out, z, noise, t, self.alphas_cumprod, prediction=self.prediction,
                                  weighting=weighting, gamma=obj.min_snr_gamma or 5.0).mean()
        if self.aligner is not None:
            target = self.per_record(batch, self.target_cache, self.alignment_targets)  # (B, D, H', W')
            align = alignment_loss(self.aligner.projector(seen[0]), target).mean()
            logs.update(diffusion=float(loss.detach()), align=float(align.detach()))
            loss = loss + obj.align.weight * align
        return loss, logs
