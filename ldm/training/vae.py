"""Training the KL autoencoder: reconstruction + beta * KL, and the PatchGAN term after its warm-up (autoencoder.losses),
with the checkpoint / EMA / accelerate loop shared with latent-diffusion training (ldm.training.loop.run_loop).

The VAE and the discriminator are two parts with their own AdamW and LR schedule. Both losses come from ONE backward:
the generator loss sees the discriminator with requires_grad off (so -D(x_rec) moves only the VAE) and the
discriminator loss sees x and x_rec detached (so it moves only D). PSNR = 10 log10(2^2 / MSE) on held-out images
(pixels in [-1, 1]) is logged to eval.csv every run.validate_every steps, with the EMA weights.

    python -m ldm.training.vae --config vae-train-tiny.yaml run.max_steps=200
    python -m ldm.training.vae --export runs/vae-tiny out/vae      # a diffusers vae/ folder (model.vae_weights)
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoencoder.distribution import DiagonalGaussian
from autoencoder.losses import VAELoss, VAELossConfig
from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.training.run_folder import hold_run_folder
from ldm.training.checkpoint import latest_checkpoint, load_weights_only
from ldm.training.loop import MetricsLogger, Part, StepContext, run_loop
from ldm.config import ConfigError, load_config, to_dict
from ldm.training.data import DataConfig, build_dataloader
from ldm.training.ema import EMA, EMAConfig
from ldm.io import load_weights, read_json
from ldm.random import seeded
from ldm.training.config import (OptimConfig, RunConfig, build_accelerator, build_lr_scheduler, build_optimizer,
                              load_train_config)


@dataclass
class VAEModelConfig:
    """`config` (a YAML of VAEConfig, seeded random init) or `pretrained` (a diffusers vae/ folder) to fine-tune."""

    config: str | None = None
    pretrained: str | None = None
    init_seed: int = 0

    def __post_init__(self) -> None:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("give exactly one of model.config (from scratch) and model.pretrained (a vae/ folder)")


@dataclass
class VAETrainConfig:
    """VAE training (ldm/configs/vae-train-tiny.yaml); run/optim/ema sections are those of ldm.training.config."""

    model: VAEModelConfig
    data: DataConfig
    eval_data: DataConfig | None = None  # held-out images for PSNR
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_lr: float | None = None  # discriminator learning rate; None: optim.lr
    sample_posterior: bool = True  # decode z ~ q(z|x) (True) or its mode
    train_encoder: bool = True  # False: fine-tune the decoder only, keeping the latent space (see `trainable`)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.run.cache_latents:
            raise ValueError("run.cache_latents has no meaning for VAE training; set it to false")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ValueError(f"disc_lr must be > 0, got {self.disc_lr}")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(peak^2 / MSE) per image, peak-to-peak 2 for pixels in [-1, 1], (B,)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse)


@contextlib.contextmanager
def frozen(module: nn.Module | None) -> Iterator[None]:
    """Temporarily turn off requires_grad of `module`'s parameters (so a loss through it does not train it)."""
    if module is None:
        yield
        return
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


def trainable(vae: AutoencoderKL, train_encoder: bool) -> list[nn.Parameter]:
    """The parameters to optimize. With train_encoder False the encoder and quant_conv are frozen, so q(z|x) and the
    latents a diffusion model was trained on stay exactly as they are while the decoder learns to draw them better
    (the decoder-only fine-tuning of Stable Diffusion's ft-EMA / ft-MSE VAEs)."""
    if not train_encoder:
        for part in (vae.encoder, vae.quant_conv):
            if part is not None:
                part.requires_grad_(False)
    return [p for p in vae.parameters() if p.requires_grad]


def check_same_trainable(meta: dict[str, Any], train_encoder: bool) -> None:
    """A run resumes with the parameters it was optimizing: refuse a flipped train_encoder (`meta`: its meta.json)."""
    recorded = meta.get("config", {}).get("train_encoder", True)
    if recorded != train_encoder:
        raise ConfigError(f"train_encoder is {train_encoder} but the checkpoint resumed from was trained with "
                          f"train_encoder={recorded}: resume with the same setting, or start a new run.output_dir")


def build_vae(model: VAEModelConfig) -> AutoencoderKL:
    """The VAE to train: a diffusers vae/ folder (AutoencoderKL.from_pretrained) or a seeded random init."""
    if model.pretrained is not None:
        return AutoencoderKL.from_pretrained(model.pretrained)
    with seeded(model.init_seed):
        return AutoencoderKL(load_config(VAEConfig, model.config))


class Reconstruct(nn.Module):
    """x -> (moments of q(z|x), decode(z)) in one forward, so that accelerate/DDP wraps a single call. Its state-dict
    keys are the VAE's with a "vae." prefix (checkpoints); `export_vae` strips it."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generators: list[torch.Generator] | None) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x)
        z = posterior.sample(generators) if generators is not None else posterior.mode()
        return posterior.parameters, self.vae.decode(z)  # (B, 2C, h, w), (B, 3, H, W)


class VAEStep:
    """The per-micro-batch objective: generator loss (+ discriminator loss once it is on)."""

    def __init__(self, config: VAETrainConfig, model: nn.Module, vae: AutoencoderKL, loss: VAELoss,
                 disc: nn.Module | None, device: torch.device) -> None:
        self.config, self.model, self.loss, self.disc, self.device = config, model, loss, disc, device
        self.last_layer = vae.decoder.conv_out.weight  # adaptive GAN weight (Esser et al. 2021, eq. 7)

    def __call__(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch["pixel_values"].to(self.device)  # (B, 3, H, W) in [-1, 1], B >= 1 (ldm.training.loop skips empty batches)
        gens = ctx.generators(len(x)) if self.config.sample_posterior else None
        moments, x_rec = self.model(x, gens)
        with frozen(self.disc):
            total, logs = self.loss.generator_loss(x, x_rec, DiagonalGaussian(moments), ctx.step,
                                                   last_layer=self.last_layer)
        if self.loss.disc_active(ctx.step):
            d_loss, d_logs = self.loss.discriminator_loss(x, x_rec, ctx.step)
            total, logs = total + d_loss, {**logs, **d_logs}
        elif self.disc is not None:  # the same CSV columns before and after the warm-up
            logs = {**logs, **dict.fromkeys(("g", "d_weight", "d_loss", "logits_real", "logits_fake"), 0.0)}
        return total, {k: float(v) for k, v in logs.items() if k != "loss"}


@torch.no_grad()
def evaluate_psnr(vae: AutoencoderKL, loader: Any, device: torch.device) -> float:
    """Mean PSNR of mode reconstructions over a loader of held-out images."""
    values = [psnr(b["pixel_values"].to(device), vae(b["pixel_values"].to(device))) for b in loader if b["captions"]]
    return float(torch.cat(values).mean())


def train_vae(config: VAETrainConfig) -> dict[str, Any]:
    """Run (or resume) VAE training; returns {"step", "checkpoint"}."""
    with hold_run_folder(config.run.output_dir):  # one run at a time; a killed run's temporaries go
        return _train_vae(config)


def _train_vae(config: VAETrainConfig) -> dict[str, Any]:
    run = config.run
    accelerator = build_accelerator(run, config.optim)
    device = accelerator.device
    vae = build_vae(config.model).to(device).train()
    vae.enable_gradient_checkpointing(run.gradient_checkpointing)
    loss = VAELoss(config.loss).to(device)
    disc = loss.discriminator
    model = Reconstruct(vae)
    ema = EMA(model, config.ema) if config.ema.enabled else None
    opt = build_optimizer(trainable(vae, config.train_encoder), config.optim)
    sched = build_lr_scheduler(opt, config.optim, run.max_steps)
    loader, position = build_dataloader(config.data, run.batch_size, num_workers=run.num_workers,
                                        num_processes=accelerator.num_processes)
    model_p, opt_p, loader_p = accelerator.prepare(model, opt, loader)
    parts = [Part("vae", model_p, opt_p, sched, ema)]
    if disc is not None:
        d_optim = OptimConfig(**{**to_dict(config.optim), "lr": config.disc_lr or config.optim.lr,
                                 "betas": tuple(config.optim.betas)})
        opt_d = build_optimizer(list(disc.parameters()), d_optim)
        disc_p, opt_d_p = accelerator.prepare(disc, opt_d)
        loss.discriminator = disc_p
        parts.append(Part("discriminator", disc_p, opt_d_p, build_lr_scheduler(opt_d, d_optim, run.max_steps)))
    eval_loader = build_dataloader(config.eval_data, run.batch_size)[0] if config.eval_data is not None else None
    eval_log = MetricsLogger(Path(run.output_dir) / "eval.csv", enabled=accelerator.is_main_process)

    def validate(step: int) -> None:
        if eval_loader is None or not run.validate_every or step % run.validate_every:
            return
        if accelerator.is_main_process:
            raw = accelerator.unwrap_model(model_p)
            with ema.swapped(raw) if ema is not None else contextlib.nullcontext():
                eval_log.log(step, {"psnr": evaluate_psnr(raw.vae.eval(), eval_loader, device)})
                raw.train()
        accelerator.wait_for_everyone()

    result = run_loop(accelerator, run, config.optim, parts=parts, loader=loader_p, position=position,
                      step_fn=VAEStep(config, model_p, vae, loss, disc, device), meta={"config": to_dict(config)},
                      on_step=validate, data=config.data,
                      on_resume=lambda meta: check_same_trainable(meta, config.train_encoder))
    accelerator.end_training()
    return result


def export_vae(run_or_checkpoint: str | Path, out_dir: str | Path, *, use_ema: bool = True) -> Path:
    """Write the (EMA) VAE of a checkpoint, or of a run folder's latest checkpoint, as a diffusers vae/ folder."""
    path = Path(run_or_checkpoint)
    ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    config = load_train_config(VAETrainConfig, None, base=read_json(ckpt / "meta.json")["config"])
    vae = build_vae(config.model)
    state = load_weights_only(ckpt, "vae", use_ema=use_ema)
    load_weights(vae, {k.removeprefix("vae."): v for k, v in state.items()}, what=f"{ckpt} vae")
    vae.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.training.vae", description="Train the KL autoencoder.")
    parser.add_argument("--config", help="YAML file mirroring ldm.training.vae.VAETrainConfig")
    parser.add_argument("--export", nargs=2, metavar=("RUN_OR_CHECKPOINT", "OUT_DIR"),
                        help="write a diffusers vae/ folder from a checkpoint instead of training")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    if args.export:
        print(export_vae(*args.export))
        return 0
    if not args.config:
        raise ConfigError("--config is required to train")
    result = train_vae(load_train_config(VAETrainConfig, args.config, args.overrides))
    print(f"finished at step {result['step']}; last checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
