"""Latent-diffusion training and fine-tuning with accelerate (Rombach et al. 2022, sec. 3-4).

One step on a batch of (image, caption): z = scaling * (E(x) sample) from the frozen VAE, c = text encoder(caption)
(frozen, or trained jointly with train_text_encoder) with the caption replaced by "" with probability p
(condition dropout, for classifier-free guidance), t ~ U{0..T-1}, eps ~ N(0, I),
z_t = sqrt(alphā_t) z + sqrt(1 - alphā_t) eps, and the U-Net regresses the eps / v / z target
(ldm.diffusion.parameterization.target) under MSE, optionally min-SNR-gamma weighted (ldm.diffusion.losses.diffusion_loss).

Every random draw of sample i comes from a generator seeded by (seed, step, micro-batch, global slot), so a resumed
run repeats the uninterrupted one bit for bit on CPU, and 2 processes x batch B match 1 process x batch 2B.

    python -m ldm.training.unet --config train-tiny.yaml run.max_steps=200 optim.lr=3e-4
    accelerate launch -m ldm.training.unet --config train-tiny.yaml run.resume=latest
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import CLIPTextConfig

from autoencoder.model import AutoencoderKL, VAEConfig  # a layer down (tests/test_imports.py)
from ldm.training.run_folder import hold_run_folder
from ldm.training.loop import Part, run_loop
from ldm.training.diffusion_step import DiffusionStep, timestep_weights
from ldm.training.lora import lora_text, lora_unet
from ldm.training.fsdp import is_sharded, reshard
from ldm.training.checkpoint import folder_digest, list_checkpoints, resolve_resume
from ldm.loading.components import Components, IncompatibleComponentsError, pipeline_schedule, save_pipeline
from ldm.loading.sources import load_components
from ldm.config import ConfigError, load_config, to_dict
from ldm.training.data import build_dataloader
from ldm.training.data_checks import DataError
from ldm.diffusion.denoiser import CFGDenoiser
from ldm.training.variance_objective import objective_schedule
from ldm.training.super_resolution import load_stage_parts, upscaler_parts
from ldm.loading.upscaler import UpscalerComponents, save_upscaler
from ldm.diffusion.samplers import SAMPLERS
from ldm.training.ema import EMA
from ldm.io import write_bytes
from ldm.random import randn, seeded
from ldm.training.repa import Aligner, PatchFeatures, Projector, block_output, output_channels
from ldm.networks.text import TextEncoder
from ldm.training.config import (TrainConfig, build_accelerator, build_lr_scheduler, build_optimizer, load_train_config,
                              sd_schedule)
from ldm.networks.unet import UNet, UNetConfig

logger = logging.getLogger(__name__)
FROZEN = "frozen"  # <output_dir>/frozen: the diffusers-layout folder of everything but the U-Net weights (with
# train_text_encoder, the text encoder there is the initial one; checkpoints hold the trained one)


# ------------------------------------------------------------------------------------------------------ building


def load_vae(folder: str | Path) -> AutoencoderKL:
    """An AutoencoderKL from a diffusers `vae/` folder."""
    return AutoencoderKL.from_pretrained(folder)


def build_components(config: TrainConfig) -> Components:
    """Fine-tune: load model.pretrained. From scratch: seeded random U-Net / VAE / CLIP text encoder from configs."""
    m = config.model
    if m.pretrained is not None:
        # a pipeline folder, a single .safetensors file or a hub name; super_resolution: ldm.training.super_resolution
        sr = config.super_resolution
        parts = load_stage_parts(sr, m.pretrained, m.init_seed) if sr else load_components(m.pretrained)
        schedule = m.schedule or parts.schedule
    else:
        unet_config = load_config(UNetConfig, m.unet)
        with seeded(m.init_seed):
            unet = UNet(unet_config)
        if m.vae_weights:
            vae = load_vae(m.vae_weights)
        else:
            with seeded(m.init_seed + 1):
                vae = AutoencoderKL(load_config(VAEConfig, m.vae))
        t = m.text
        clip = CLIPTextConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                              num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                              max_position_embeddings=t.max_position_embeddings, vocab_size=t.vocab_size,
                              projection_dim=t.projection_dim)
        text = TextEncoder.from_config(clip, seed=m.init_seed + 2, pad_token=t.pad_token)
        parts = Components(unet, vae, text, sd_schedule())
        schedule = m.schedule or parts.schedule
    if config.objective.prediction_type is not None:
        schedule = dataclasses.replace(schedule, prediction_type=config.objective.prediction_type)
    # a variance head: variance_type learned_range, exported for diffusers' DDPMScheduler
    schedule, parts.scheduler_config = objective_schedule(config.objective.variance, schedule, parts.scheduler_config)
    parts.schedule = pipeline_schedule(schedule)  # what the exported folder samples with, here and in diffusers
    if config.super_resolution is not None:  # a cascade's super-resolution stage (ldm.training.super_resolution)
        return upscaler_parts(config.super_resolution, parts)
    try:
        parts.check()
    except IncompatibleComponentsError as e:
        raise ConfigError(str(e)) from e
    return parts


def save_frozen(folder: Path, parts: Components, unet_weights: bool = False) -> None:
    """Write the frozen parts and the U-Net config as a diffusers-layout folder (export adds the U-Net weights); a
    LoRA run writes the U-Net weights too (unet_weights): frozen/ is then the base pipeline its LoRA applies to."""
    if isinstance(parts, UpscalerComponents):  # super_resolution: a StableDiffusionUpscalePipeline folder
        return save_upscaler(folder, parts, unet_weights=unet_weights)
    save_pipeline(folder, unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, schedule=parts.schedule,
                  scheduler_config=parts.scheduler_config, unet_weights=unet_weights)


# ----------------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def render_grid(parts: Components, unet: torch.nn.Module, prompts: list[str], seeds: list[int], *, size: int,
                steps: int, guidance_scale: float) -> Image.Image:
    """prompts x seeds images (rows x columns) with the Euler sampler and classifier-free guidance, from the same
    initial latent as pipelines.text_to_image.Pipeline for the same seed and schedule."""
    schedule, vae, text = parts.schedule, parts.vae, parts.text_encoder
    device = next(unet.parameters()).device
    euler = SAMPLERS["euler"]
    plan = euler.plan(schedule, steps)  # as the Pipeline takes it
    sigmas = plan.sigmas
    den = CFGDenoiser(plan.denoiser(unet), guidance_scale)  # the denoiser the Pipeline builds
    prior_scale = plan.prior_scale  # the Pipeline's start (diffusers' init_noise_sigma)
    latent = size // vae.downsample_factor
    empty = text.empty_embedding(1)
    rows = []
    for prompt in prompts:
        c = text.encode([prompt])
        for seed in seeds:
            x = randn((1, unet.config.in_channels, latent, latent), torch.Generator().manual_seed(seed), device=device)
            # As the Pipeline starts: x_T = eps * sqrt(1 + sigma_max^2), the VP prior (diffusers' init_noise_sigma for
            # "leading" spacing), or eps * sigma_max where diffusers' Euler does (linspace / trailing)
            z = euler(den, x * prior_scale, sigmas, **plan.options,
                      cond={"cond": {"encoder_hidden_states": c}, "uncond": {"encoder_hidden_states": empty}})
            rows.append(vae.decode(vae.unscale_latents(z.to(next(vae.parameters()).dtype))).float().cpu())
    images = ((torch.cat(rows).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (P*S, 3, H, W)
    n_cols = len(seeds)
    grid = images.reshape(len(prompts), n_cols, *images.shape[1:]).permute(0, 3, 1, 4, 2)  # (P, H, S, W, 3)
    return Image.fromarray(grid.reshape(len(prompts) * size, n_cols * size, 3).numpy())


# ------------------------------------------------------------------------------------------------------------ run


def text_part(config: TrainConfig, text: torch.nn.Module, accelerator: Any) -> Part:
    """The text encoder as a trained Part: float32 weights (or, with lora.text_encoder_targets, its LoRA alone), its
    own AdamW (text_encoder_lr), schedule and EMA."""
    text.requires_grad_(config.lora is None)
    lora = lora_text(config.lora, text.model) if config.lora is not None else None  # frozen, but for the adapters
    text.train().to(accelerator.device)
    ema = EMA(text if lora is None else lora, config.ema) if config.ema.enabled else None
    optim = dataclasses.replace(config.optim, lr=config.text_encoder_lr or config.optim.lr)
    optimizer = build_optimizer([p for p in text.parameters() if p.requires_grad], optim)
    scheduler = build_lr_scheduler(optimizer, optim, config.run.max_steps)
    text_p, optimizer_p = accelerator.prepare(text, optimizer)
    return Part("text_encoder", text_p, optimizer_p, scheduler, ema, state=lora)


def align_part(config: TrainConfig, unet: torch.nn.Module, text_width: int, accelerator: Any
               ) -> tuple[Part, Aligner]:
    """REPA's projector as a trained Part (its own AdamW at optim.lr, the same schedule, no EMA), the frozen target
    encoder and the hooked U-Net block; the projector's input width is read from one dry pass of the U-Net."""
    align, device = config.objective.align, accelerator.device
    features = PatchFeatures.from_folder(align.encoder).to(device)
    block = block_output(unet, align.block)
    size = unet.config.sample_size
    x = torch.zeros(1, unet.config.in_channels, size, size, device=device)
    context = torch.zeros(1, 77, text_width, device=device)  # any token count: cross-attention keys
    was_training = unet.training
    unet.eval()
    channels = output_channels(block, lambda: unet(x, torch.zeros(1, dtype=torch.long, device=device),
                                                  encoder_hidden_states=context))
    unet.train(was_training)
    with seeded(config.model.init_seed + 3):
        projector = Projector(channels, features.width, align.hidden).to(device)
    optimizer = build_optimizer(list(projector.parameters()), config.optim)
    scheduler = build_lr_scheduler(optimizer, config.optim, config.run.max_steps)
    projector_p, optimizer_p = accelerator.prepare(projector, optimizer)
    return Part("projector", projector_p, optimizer_p, scheduler, None), Aligner(features, projector_p, block)


def check_fresh_run(out: Path) -> None:
    """A fresh run (run.resume unset) must not reuse a run folder: its frozen/ parts or checkpoints would be mixed
    with this run's U-Net."""
    taken = [name for name in (FROZEN, "checkpoints") if (out / name).exists()]
    if taken:
        raise FileExistsError(f"run.output_dir {out} already holds {' and '.join(f'{t}/' for t in taken)} of another "
                              "run: continue it with run.resume=latest (--resume latest), or choose another output_dir")


def check_frozen(state: dict[str, Any], digest: str, folder: Path) -> None:
    """The checkpoint resumed from must have been trained with the frozen parts now in `folder`."""
    recorded = state.get("frozen_sha256")
    if recorded is not None and recorded != digest:
        raise ValueError(f"{folder} (sha256 {digest[:12]}...) is not the frozen VAE/text encoder/schedule this "
                         f"checkpoint was trained with (sha256 {recorded[:12]}...)")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; returns {"step", "checkpoint"} of the last checkpoint.

    `<output_dir>/frozen` is written when there is no checkpoint to resume from, and its sha256 (ldm.training.checkpoint.
    folder_digest) goes into every checkpoint's meta.json, where resume and ldm.training.export check it."""
    with hold_run_folder(config.run.output_dir):  # one run at a time; a killed run's temporaries go
        return _train(config)


def _train(config: TrainConfig) -> dict[str, Any]:
    run = config.run
    out = Path(run.output_dir)
    if run.resume is None:
        check_fresh_run(out)
    accelerator = build_accelerator(run, config.optim)
    parts = build_components(config)
    t_weights = timestep_weights(config, parts.schedule.num_train_timesteps)  # before frozen/ is written
    no_checkpoint = resolve_resume(out / "checkpoints", run.resume) is None
    # the data is read before anything is written, so a run refused for its data leaves nothing behind to block a retry
    loader, position = build_dataloader(config.data, run.batch_size, num_workers=run.num_workers,
                                        num_processes=accelerator.num_processes)
    if accelerator.is_main_process and (no_checkpoint or not (out / FROZEN).is_dir()):
        # (re)written when no checkpoint names it; resume checks its digest. A LoRA run's holds the base U-Net too
        save_frozen(out / FROZEN, parts, unet_weights=config.lora is not None)
    accelerator.wait_for_everyone()
    digest = folder_digest(out / FROZEN)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(run.mixed_precision, torch.float32)
    device = accelerator.device
    train_text = config.train_text_encoder
    for frozen in (parts.vae,) if train_text else (parts.vae, parts.text_encoder):
        frozen.requires_grad_(False).eval().to(device, dtype)
    unet = parts.unet.to(device)
    unet.gradient_checkpointing = run.gradient_checkpointing
    unet.train()
    lora = lora_unet(config.lora, unet, dtype) if config.lora is not None else None  # the adapters alone are trained
    ema = EMA(unet if lora is None else lora, config.ema) if config.ema.enabled else None
    optimizer = build_optimizer([p for p in unet.parameters() if p.requires_grad], config.optim)
    scheduler = build_lr_scheduler(optimizer, config.optim, run.max_steps)
    unet_p, optimizer_p, loader_p = accelerator.prepare(unet, optimizer, loader)
    trained = [Part("unet", unet_p, optimizer_p, scheduler, ema, state=lora)]
    if train_text or (config.lora is not None and config.lora.text_encoder_targets):  # the whole, or a LoRA
        trained.append(text_part(config, parts.text_encoder, accelerator))  # training mode: validation encodes its
        # empty prompt afresh (PromptEncoder.empty_embedding)
    aligner = None
    if config.objective.align.weight > 0:
        part, aligner = align_part(config, unet, parts.text_encoder.hidden_size, accelerator)
        trained.append(part)
    text_p = next((p.model for p in trained if p.name == "text_encoder"), None)  # trained whole or its LoRA
    step_fn = DiffusionStep(config, parts, unet_p, device, dtype, text=text_p,
                            t_weights=t_weights, dataset=loader.dataset, aligner=aligner)

    def validate(step: int) -> None:
        if not run.validate_every or step % run.validate_every:
            return
        raw = accelerator.unwrap_model(unet_p)
        if accelerator.is_main_process or is_sharded([raw]):  # FSDP: every process takes part in the forward passes
            with contextlib.ExitStack() as swaps:
                for part in trained:
                    if part.ema is not None:
                        swaps.enter_context(part.ema.swapped(
                            accelerator.unwrap_model(part.model) if part.state is None else part.state))
                raw.eval()
                grid = render_grid(parts, raw, run.validation_prompts, run.validation_seeds,
                                   size=config.data.resolution, steps=run.validation_steps,
                                   guidance_scale=run.guidance_scale)
                raw.train()
                reshard(accelerator.unwrap_model(p.model) for p in trained)  # FSDP: before the EMA swaps back
        if accelerator.is_main_process:
            png = io.BytesIO()
            grid.save(png, format="PNG")
            write_bytes(png.getvalue(), out / "validation" / f"step-{step:08d}.png")
        accelerator.wait_for_everyone()

    meta = {"config": to_dict(config), "frozen": f"../../{FROZEN}", "frozen_sha256": digest,
            "fsdp": is_sharded([accelerator.unwrap_model(unet_p)])}  # sharded or not, a checkpoint holds full tensors
    try:
        result = run_loop(accelerator, run, config.optim, parts=trained, loader=loader_p, position=position,
                          step_fn=step_fn, meta=meta, on_step=validate, data=config.data,
                          on_resume=lambda state: check_frozen(state, digest, out / FROZEN))
    except DataError:  # refused for its data before any checkpoint: frozen/ must not block a retry as "another run"
        if accelerator.is_main_process and not list_checkpoints(out / "checkpoints"):
            shutil.rmtree(out / FROZEN, ignore_errors=True)
        raise
    accelerator.end_training()
    return result


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="ldm train", description="Train or fine-tune a latent diffusion U-Net.")
    parser.add_argument("--config", required=True, help="YAML file mirroring ldm.training.config.TrainConfig")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as run.resume=...)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=3e-4 run.max_steps=100")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"run.resume={args.resume}"] if args.resume else [])
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (`python -m ldm.training.unet`, `accelerate launch -m ldm.training.unet`, `ldm train`)."""
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_train_config(TrainConfig, args.config, overrides)
    result = train(config)
    logger.info("finished at step %d; last checkpoint %s", result["step"], result["checkpoint"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
