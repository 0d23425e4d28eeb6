"""The training config tree (mirrored by ldm/configs/train-*.yaml) and the objects it builds: optimizer, LR schedule,
Accelerator. Shared by latent-diffusion training (ldm.training.unet) and VAE training (ldm.training.vae).

    TrainConfig
      model:     pretrained folder, or unet/vae YAML files + a text-encoder shape (from scratch); noise schedule
      data:      ldm.training.data.DataConfig
      objective: prediction type, min-SNR gamma, condition dropout, noise offset
      optim:     AdamW, warm-up + decay (diffusers.optimization.get_scheduler), grad accumulation, clipping
      ema:       ldm.training.ema.EMAConfig
      run:       seed, steps, batch, precision, checkpoints, validation, output

Load with `load_train_config(path, overrides)`; `key.sub=value` overrides go through ldm.config.apply_overrides.
Every unknown key or bad value raises ldm.config.ConfigError naming it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from ldm.config import ConfigError, apply_overrides, from_dict, load_yaml
from ldm.training.data import DataConfig
from ldm.training.ema import EMAConfig
from ldm.training.variance_objective import check_objective
from ldm.training.lora import LoraConfig
from ldm.training.super_resolution import SuperResolutionConfig, check_training_config
from ldm.diffusion.schedule import NoiseSchedule, sd_schedule  # noqa: F401 - sd_schedule re-exported

T = TypeVar("T")
Precision = Literal["no", "fp16", "bf16"]
LRSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


@dataclass
class TextModelConfig:
    """Shape of a from-scratch CLIP text encoder (transformers CLIPTextConfig keys), seeded random weights."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    max_position_embeddings: int = 77
    vocab_size: int = 49408
    projection_dim: int = 32
    pad_token: str = "<|endoftext|>"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")


@dataclass
class ModelConfig:
    """Either `pretrained` (anything Pipeline.from_pretrained loads: a diffusers-layout folder, a single .safetensors
    checkpoint, a hub name; ldm.loading.load_components) to fine-tune, or `unet` + `vae` (YAML files of UNetConfig /
    VAEConfig, or bundled configs by bare name) + `text` to train from scratch. `vae_weights` (a diffusers vae/ folder)
    gives the frozen VAE trained weights when training from scratch. Relative paths are from the cwd."""

    pretrained: str | None = None
    unet: str | None = None
    vae: str | None = None
    vae_weights: str | None = None
    text: TextModelConfig | None = None
    schedule: NoiseSchedule | None = None  # None: the pretrained folder's scheduler, else sd_schedule()
    init_seed: int = 0  # seed of from-scratch weights

    def __post_init__(self) -> None:
        scratch = {k: getattr(self, k) for k in ("unet", "vae", "text")}
        if self.pretrained is not None:
            given = [k for k, v in scratch.items() if v is not None]
            if given:
                raise ValueError(f"model.pretrained is set, so model.{given} must not be (fine-tuning loads them)")
        else:
            missing = [k for k, v in scratch.items() if v is None]
            if missing:
                raise ValueError(f"from scratch (no model.pretrained) needs model.{missing}")


@dataclass
class TimestepBiasConfig:
    """Non-uniform training timesteps (ldm.diffusion.losses.timestep_bias_weights): the biased ones' weight times
    `multiplier` (0 leaves them out). later: the noisiest `portion`; earlier: the least noisy; range: [begin, end)."""

    strategy: Literal["none", "earlier", "later", "range"] = "none"
    multiplier: float = 1.0
    portion: float = 0.25
    begin: int = 0
    end: int | None = None  # range: None = the number of training timesteps

    def __post_init__(self) -> None:
        if self.multiplier < 0:
            raise ValueError(f"timestep_bias.multiplier must be >= 0, got {self.multiplier}")
        if not 0 < self.portion <= 1:
            raise ValueError(f"timestep_bias.portion must lie in (0, 1], got {self.portion}")
        if self.begin < 0 or (self.end is not None and self.end <= self.begin):
            raise ValueError(f"timestep_bias range [{self.begin}, {self.end}) is empty or negative")


@dataclass
class AlignConfig:
    """Representation alignment (ldm.training.repa, REPA): weight * L_REPA is added to the loss; weight 0 switches it off."""

    weight: float = 0.0  # lambda (the paper's 0.5)
    block: str = "down_blocks.1.attentions.0"  # the U-Net submodule whose (B, C, h, w) output is aligned
    encoder: str | None = None  # an ldm.training.clip CLIP folder: its image tower's patch tokens are the targets
    hidden: int = 256  # width of the projector MLP

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"align.weight must be >= 0, got {self.weight}")
        if self.weight > 0 and not self.encoder:
            raise ValueError("align.weight > 0 needs align.encoder: a CLIP folder (ldm.training.clip) for the targets")
        if self.hidden < 1:
            raise ValueError(f"align.hidden must be >= 1, got {self.hidden}")


@dataclass
class ObjectiveConfig:
    """What the U-Net regresses and how the loss is weighted."""

    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = None  # None: the schedule's
    min_snr_gamma: float | None = None  # Hang et al. 2023; None: plain MSE (Ho et al. 2020, L_simple)
    condition_dropout: float = 0.1  # p of replacing a caption by "" (Ho & Salimans 2022, classifier-free guidance)
    noise_offset: float = 0.0  # eps += offset * N(0, 1) per (sample, channel) (Guttenberg 2023)
    timestep_bias: TimestepBiasConfig = field(default_factory=TimestepBiasConfig)  # p(t); default uniform
    align: AlignConfig = field(default_factory=AlignConfig)  # REPA; off by default
    # Nichol & Dhariwal 2021 (ldm.training.variance_objective): simple (L_simple), hybrid (L_simple + hybrid_lambda
    # L_vlb, needs variance learned_range) or vlb (importance-sampled L_vlb); learned_range: U-Net out_channels = 2 x in
    loss: Literal["simple", "hybrid", "vlb"] = "simple"
    variance: Literal["fixed", "learned_range"] = "fixed"
    hybrid_lambda: float = 0.001

    def __post_init__(self) -> None:
        check_objective(self.loss, self.variance, self.timestep_bias.strategy, self.min_snr_gamma)
        if self.hybrid_lambda < 0:
            raise ValueError(f"hybrid_lambda must be >= 0, got {self.hybrid_lambda}")
        if not 0.0 <= self.condition_dropout <= 1.0:
            raise ValueError(f"condition_dropout must lie in [0, 1], got {self.condition_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or null), got {self.min_snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0, got {self.noise_offset}")


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) with a diffusers LR schedule; steps count optimizer updates."""

    lr: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1.0e-2
    eps: float = 1.0e-8
    lr_scheduler: LRSchedule = "constant_with_warmup"
    warmup_steps: int = 0
    num_cycles: int = 1  # cosine_with_restarts
    power: float = 1.0  # polynomial
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    fused: bool = False  # torch's fused AdamW kernel: same update up to rounding, faster (opt-in, as in torch)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError(f"weight_decay must be >= 0 and eps > 0, got {self.weight_decay}, {self.eps}")
        if self.warmup_steps < 0 or self.gradient_accumulation_steps < 1:
            raise ValueError("warmup_steps must be >= 0 and gradient_accumulation_steps >= 1")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 (or null for no clipping), got {self.max_grad_norm}")


@dataclass
class RunConfig:
    """The run: randomness, length, batch, precision, checkpoints, validation and logging."""

    output_dir: str = "runs/train"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 4  # per device (per process); the global batch is batch_size * processes * accumulation
    mixed_precision: Precision | bool = "no"  # YAML reads a bare `no` as false: taken as "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # encode each image once, keep q(z|x)'s moments in memory (needs no random crop/flip)
    num_workers: int = 0
    checkpoint_every: int = 500
    keep_last: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    validate_every: int = 0  # 0: never
    validation_prompts: list[str] = field(default_factory=lambda: ["a red circle above a blue square"])
    validation_seeds: list[int] = field(default_factory=lambda: [0])
    validation_steps: int = 20
    guidance_scale: float = 5.0
    log_every: int = 10
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.mixed_precision, bool):
            if self.mixed_precision:
                raise ValueError("run.mixed_precision must be 'no', 'fp16' or 'bf16', got true")
            self.mixed_precision = "no"
        for name in ("max_steps", "batch_size", "checkpoint_every", "keep_last", "log_every", "validation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        if self.validate_every < 0 or self.num_workers < 0:
            raise ValueError("run.validate_every and run.num_workers must be >= 0")
        if self.validate_every and not (self.validation_prompts and self.validation_seeds):
            raise ValueError("run.validate_every > 0 needs validation_prompts and validation_seeds")


@dataclass
class TrainConfig:
    """Latent-diffusion training / fine-tuning (ldm/configs/train-tiny.yaml, ldm/configs/train-finetune-example.yaml)."""

    model: ModelConfig
    data: DataConfig
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # Train the text encoder jointly with the U-Net (as LDM's text-to-image model did; diffusers' --train_text_encoder),
    # with its own AdamW at text_encoder_lr (null: optim.lr), the same schedule and EMA; the export writes it.
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    lora: LoraConfig | None = None  # ldm.training.lora: train low-rank adapters only; null: the whole U-Net
    # a cascade's super-resolution stage (ldm.training.super_resolution): the U-Net takes the augmented low-res image
    super_resolution: SuperResolutionConfig | None = None

    def __post_init__(self) -> None:
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise ValueError(f"text_encoder_lr must be > 0 (or null for optim.lr), got {self.text_encoder_lr}")
        if self.lora is not None and self.train_text_encoder:
            raise ValueError("lora and train_text_encoder exclude each other: train a text-encoder LoRA with "
                             "lora.text_encoder_targets instead")
        if self.super_resolution is not None:
            check_training_config(self)
        if self.run.cache_latents and (self.data.crop == "random" or self.data.random_flip):
            raise ValueError("run.cache_latents needs deterministic images: set data.crop=center, data.random_flip=false")


def load_train_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None,
                      base: dict[str, Any] | None = None) -> T:
    """`cls` from a YAML file (or `base`) with `key.sub=value` overrides applied; errors name the bad key."""
    data = load_yaml(path) if path is not None else dict(base or {})
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data, where=str(path) if path is not None else cls.__name__)


# ------------------------------------------------------------------------------------------------------- builders


def build_optimizer(params: list[torch.nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `params` with the configured lr, betas, weight decay and eps; torch's fused kernel if optim.fused."""
    if not params:
        raise ConfigError("no trainable parameters to optimize")
    return torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay,
                             eps=config.eps, fused=True if config.fused else None)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
                       ) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers.optimization.get_scheduler(name, warm-up, max_steps): stepped once per optimizer update."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=max_steps, num_cycles=config.num_cycles, power=config.power)


def build_accelerator(run: RunConfig, optim: OptimConfig):
    """Accelerator(mixed_precision, gradient_accumulation_steps); batches hold caption strings, so every process
    reads its own shard (dispatch_batches=False) and batches are not split (each process gets run.batch_size)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from ldm.training.fsdp import fsdp_plugin, fsdp_requested, use_fsdp_on_cpu

    if run.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("run.mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    # Started by torchrun (e.g. `accelerate launch --multi_gpu`) on a machine without CUDA: accelerate only picks
    # multi-process CPU (gloo) when told cpu=True, otherwise every process would train alone.
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    fsdp = fsdp_plugin() if fsdp_requested() else None  # accelerate launch --use_fsdp (ldm.training.fsdp)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(dispatch_batches=False, split_batches=False),
        fsdp_plugin=fsdp,
    )
    if fsdp is not None:
        use_fsdp_on_cpu(accelerator, fsdp)
    warn_if_one_of_several(accelerator.num_processes, os.environ)
    return accelerator


def warn_if_one_of_several(num_processes: int, env: Mapping[str, str]) -> bool:
    """Warn (and return True) when `accelerate launch --num_processes N` started this process alone: its simple
    launcher (taken with --cpu, or without --multi_gpu) sets MASTER_PORT for N processes but starts one, which then
    trains by itself at the whole batch, silently."""
    launched = any(k.startswith("ACCELERATE_") for k in env)  # not a SLURM script's own MASTER_PORT
    alone = num_processes == 1 and launched and "MASTER_PORT" in env and "WORLD_SIZE" not in env
    if alone:
        warnings.warn("accelerate launch was asked for several processes but started this one alone (its simple "
                      "launcher, which --cpu selects): training runs in ONE process. For several local processes use "
                      "`accelerate launch --multi_gpu --num_processes N ...` (torchrun; gloo DDP on a CPU-only "
                      "machine), as ldm.training.launch does", stacklevel=2)
    return alone
