"""Train a noise-aware CLIP for CLIP guidance (GLIDE, Nichol et al. 2022, sec. 2.4; ldm.networks.noisy_clip): the
image tower reads latents of a pipeline's VAE noised by its schedule (t uniform over the training timesteps), the
text tower projects the pooled output of that pipeline's own text encoder (frozen: each caption encoded once), and
both learn by CLIP's symmetric InfoNCE with a learnable temperature (Radford et al. 2021), where other items of the
batch with the identical caption are not negatives.

Data: an image folder with metadata.jsonl (ldm.shapes.dataset.export_imagefolder writes one), caption = "text".

    python -c "from ldm.shapes.dataset import export_imagefolder; export_imagefolder('data/shapes-clip-64', 4096, \
        'train', 0, size=64, layouts={'single': 0.5, 'relation': 0.5})"
    python -m ldm.training.noisy_clip --config train-noisy-clip-shapes.yaml data=data/shapes-clip-64

writes `output_dir` (config.json + model.safetensors + training.json) for `pipe(..., noisy_clip=output_dir,
clip_guidance_scale=...)`, or as a model folder's `noisy_clip/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.config import ConfigError, config_path, to_dict
from ldm.diffusion.process import q_sample
from ldm.io import write_json
from ldm.networks.noisy_clip import (
    NoisyCLIP,
    NoisyCLIPConfig,
    pooled_text,
    pooled_text_dim,
)
from ldm.networks.text import TextEncoder
from ldm.random import seeded
from ldm.training.clip import clamp_logit_scale
from ldm.training.config import load_train_config
from ldm.training.noisy_latents import (
    encode,
    folder_images,
    noisy_batch,
    pipeline_vae_schedule,
)

logger = logging.getLogger(__name__)


@dataclass
class NoisyCLIPTrainConfig:
    """What `python -m ldm.training.noisy_clip` trains (mirrored by ldm/configs/train-noisy-clip-shapes.yaml). The
    model's in_channels, sample_size, num_train_timesteps and text_dim are taken from `pipeline`."""

    data: str = "data/shapes-clip-64"  # an image folder with metadata.jsonl ("text": the caption)
    pipeline: str = "default"  # whose VAE encodes, schedule noises and text encoder reads; "default": bundled
    model: NoisyCLIPConfig = field(default_factory=NoisyCLIPConfig)
    resolution: int = 64
    max_records: int | None = None  # None: every record
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 50
    eval_timesteps: tuple[int, ...] = (0, 250, 500, 750, 999)  # where training.json reports retrieval accuracy
    output_dir: str = "runs/noisy-clip"

    def __post_init__(self) -> None:
        for name in ("resolution", "steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch), got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def contrastive_logits(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                       caption_ids: torch.Tensor) -> torch.Tensor:
    """CLIP's logits exp(tau) I T^T (Radford et al. 2021, fig. 3), (B, B), with -inf where an OTHER item has the
    identical caption (not a negative: ldm.training.clip's negclip_loss has no such mask)."""
    logits = logit_scale.exp() * image @ text.T  # (B, B)
    same = caption_ids[:, None] == caption_ids[None, :]
    other = same & ~torch.eye(len(caption_ids), dtype=torch.bool, device=same.device)
    return logits.masked_fill(other, float("-inf"))


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              caption_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropy (Radford et al. 2021, fig. 3) over
    `contrastive_logits` (identical captions masked out of the softmax)."""
    logits = contrastive_logits(image, text, logit_scale, caption_ids)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def retrieval_accuracy(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor) -> tuple[float, float]:
    """(share of images whose most similar caption among the batch's is their own, the share a random pick gets)."""
    pick = (image @ text.T).argmax(1)  # (B,)
    same = caption_ids[:, None] == caption_ids[None, :]
    return float((caption_ids[pick] == caption_ids).float().mean()), float(same.float().mean())


@torch.no_grad()
def evaluate(model: NoisyCLIP, latents: torch.Tensor, pooled: torch.Tensor, caption_ids: torch.Tensor,
             alphas_cumprod: torch.Tensor, timesteps: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Zero-shot retrieval of each item's caption among the batch's at fixed timesteps (one noise draw, seeded)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    text = model.encode_text(pooled)
    out: dict[str, Any] = {}
    for t in timesteps:
        t = min(max(int(t), 0), len(alphas_cumprod) - 1)
        tt = torch.full((len(latents),), t)
        image = model.encode_image(q_sample(latents, tt, alphas_cumprod, noise), tt.float())
        out[str(t)], chance = retrieval_accuracy(image, text, caption_ids)
    return {"retrieval_accuracy": out, "chance": chance, "items": len(latents)}


def train_noisy_clip(config: NoisyCLIPTrainConfig, command: str | None = None) -> dict[str, Any]:
    """Train and save the noise-aware CLIP; returns {"output_dir", "loss" (the mean of the last log window),
    "logit_scale", "records", "captions", "skipped", "eval"}. `command`: recorded in training.json."""
    folder, vae, schedule = pipeline_vae_schedule(config.pipeline, config.resolution)
    text_encoder = TextEncoder.from_pretrained(folder).eval()
    model_config = dataclasses.replace(config.model, in_channels=vae.config.latent_channels,
                                       sample_size=config.resolution // vae.config.downsample_factor,
                                       num_train_timesteps=schedule.num_train_timesteps,
                                       text_dim=pooled_text_dim(text_encoder))

    def caption(record: dict[str, Any]) -> str | None:
        text = record.get("text")
        return text if isinstance(text, str) else None

    images, captions, skipped = folder_images(config.data, config.resolution, config.max_records, caption,
                                              "the noise-aware CLIP")
    if len(captions) < 2:
        raise ConfigError(f"{Path(config.data) / 'metadata.jsonl'}: {len(captions)} record(s) with a \"text\" caption; "
                          "the contrastive loss needs at least 2")
    unique = sorted(set(captions))
    caption_ids = torch.tensor([unique.index(c) for c in captions])  # (N,)
    pooled = torch.cat([pooled_text(text_encoder, unique[i:i + 256]).float()
                        for i in range(0, len(unique), 256)])  # (U, text_dim), the frozen encoder's, once
    latents = encode(vae, images)  # (N, C, h, w)
    alphas_cumprod = schedule.alphas_cumprod()
    with seeded(config.seed):
        model = NoisyCLIP(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    window: list[float] = []
    model.train()
    for step in range(1, config.steps + 1):
        idx, x_t, t = noisy_batch(latents, alphas_cumprod, config.batch_size, g)
        ids = caption_ids[idx]
        clamp_logit_scale(model)  # exp(tau) in [1, 100], as CLIP
        loss = clip_loss(model.encode_image(x_t, t), model.encode_text(pooled[ids]), model.logit_scale, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(float(loss.detach()))
        if step % config.log_every == 0 or step == config.steps:
            logger.info("step %d: loss %.4f logit_scale %.3f", step, sum(window) / len(window),
                        float(model.logit_scale.detach()))
            if step < config.steps:
                window = []
    if not all(math.isfinite(v) for v in window):
        raise FloatingPointError("the noise-aware CLIP's loss is not finite: lower lr")
    model.eval()
    n_eval = min(len(latents), config.batch_size)
    evaluation = evaluate(model, latents[:n_eval], pooled[caption_ids[:n_eval]], caption_ids[:n_eval],
                          alphas_cumprod, config.eval_timesteps, config.seed)
    out = Path(config.output_dir)
    model.save_pretrained(out)
    result = {"output_dir": str(out), "loss": sum(window) / len(window),
              "logit_scale": float(model.logit_scale.detach()),
              "records": len(captions), "captions": len(unique), "skipped": skipped, "eval": evaluation}
    write_json({"command": command, "config": to_dict(config), **result}, out / "training.json")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m ldm.training.noisy_clip --config train-noisy-clip-shapes.yaml [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="python -m ldm.training.noisy_clip",
                                     description="Train a noise-aware CLIP for CLIP guidance.")
    parser.add_argument("--config", required=True, help="YAML mirroring NoisyCLIPTrainConfig (a bare name: bundled)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. steps=500 batch_size=64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_train_config(NoisyCLIPTrainConfig, config_path(args.config), args.overrides)
    argv = sys.argv[1:] if argv is None else argv
    result = train_noisy_clip(config, command=" ".join(["python -m ldm.training.noisy_clip", *argv]))
    logger.info("saved %s (retrieval accuracy %s, chance %.3f)", result["output_dir"],
                result["eval"]["retrieval_accuracy"], result["eval"]["chance"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
