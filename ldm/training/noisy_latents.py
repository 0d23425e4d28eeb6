"""What the trainers of noise-aware guidance networks share (ldm.training.classifier, ldm.training.noisy_clip): images
of an image folder with metadata.jsonl and a value per record, their latents through a pipeline's VAE, and noisy
batches x_t = sqrt(alphā_t) x0 + sqrt(1 - alphā_t) eps of its schedule at t uniform over the training timesteps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from autoencoder.model import AutoencoderKL
from ldm.config import ConfigError
from ldm.diffusion.process import q_sample
from ldm.diffusion.schedule import NoiseSchedule
from ldm.loading.components import load_schedule
from ldm.loading.sources import DEFAULT_MODEL
from ldm.training.data import resize_shorter_side, to_tensor


def metadata_value(record: dict[str, Any], path: str) -> Any:
    """The value at a dotted key path ("prompt.objects.0.color": dict keys and list indices); None when absent."""
    node: Any = record
    for key in path.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return None
    return node


def folder_images(folder: str | Path, resolution: int, max_records: int | None, value_of: Callable[[dict], Any],
                  what: str) -> tuple[torch.Tensor, list[Any], int]:
    """(images (N, 3, R, R) in [-1, 1] center-cropped, values, records skipped) of the folder's metadata.jsonl; a
    record whose `value_of(record)` is None is skipped. `what` names the trainer in errors."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: {what} trains on an image folder with metadata.jsonl "
                                "(ldm.shapes.dataset.export_imagefolder writes one)")
    images, values, skipped = [], [], 0
    for line in meta.read_text().splitlines():
        if max_records is not None and len(values) >= max_records:
            break
        record = json.loads(line)
        value = value_of(record)
        if value is None:
            skipped += 1
            continue
        with Image.open(folder / record["file_name"]) as image:
            image = resize_shorter_side(image.convert("RGB"), resolution)
            w, h = image.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        images.append(to_tensor(image))
        values.append(value)
    return (torch.stack(images) if images else torch.empty(0, 3, resolution, resolution)), values, skipped


def pipeline_vae_schedule(pipeline: str, resolution: int) -> tuple[Path, AutoencoderKL, NoiseSchedule]:
    """(folder, VAE, schedule) of a pipeline folder ("default": the bundled model); the resolution must be a multiple
    of the VAE's factor."""
    folder = DEFAULT_MODEL if pipeline == "default" else Path(pipeline)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    factor = vae.config.downsample_factor
    if resolution % factor:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE factor {factor}")
    return folder, vae, load_schedule(folder / "scheduler")


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Scaled latents of the posterior means (the latents a sampler ends at), (N, C, h, w)."""
    return torch.cat([vae.scale_latents(vae.encode(images[i:i + batch]).mode()) for i in range(0, len(images), batch)])


def noisy_batch(latents: torch.Tensor, alphas_cumprod: torch.Tensor, batch_size: int,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices (B,), x_t (B, C, h, w), t (B,) float): a random batch of the latents noised at t uniform over the
    schedule's training timesteps."""
    idx = torch.randint(0, len(latents), (batch_size,), generator=g)
    t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=g)
    noise = torch.randn(latents[idx].shape, generator=g)
    return idx, q_sample(latents[idx], t, alphas_cumprod, noise), t.float()
