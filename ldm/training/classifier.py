"""Train a noisy classifier f_phi(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4): cross-entropy on
latents of a pipeline's VAE noised by its schedule, t uniform over the training timesteps.

Data: an image folder with metadata.jsonl (ldm.shapes.dataset.export_imagefolder writes one); each record's label is
the metadata value at `model.attribute`, a dotted key path (e.g. "prompt.objects.0.color"), and must be one of
`model.labels` (records without the key, or with a value outside the labels, are skipped and counted).

    python -c "from ldm.shapes.dataset import export_imagefolder; export_imagefolder('data/shapes-single', 2048, \
        'train', 0, size=64, layouts={'single': 1.0})"
    python -m ldm.training.classifier --config train-classifier-shapes.yaml data=data/shapes-single

writes `output_dir` (config.json + model.safetensors) for `pipe(..., classifier=output_dir, label="red")`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ldm.config import ConfigError, config_path, to_dict
from ldm.io import write_json
from ldm.networks.classifier import ClassifierConfig, NoisyClassifier
from ldm.random import seeded
from ldm.training.config import load_train_config
from ldm.training.noisy_latents import (
    encode,
    folder_images,
    metadata_value,
    noisy_batch,
    pipeline_vae_schedule,
)

__all__ = ["ClassifierTrainConfig", "encode", "labelled_images", "main", "metadata_value", "train_classifier"]

logger = logging.getLogger(__name__)


@dataclass
class ClassifierTrainConfig:
    """What `python -m ldm.training.classifier` trains (mirrored by ldm/configs/train-classifier-shapes.yaml). The
    classifier's in_channels, sample_size and num_train_timesteps are taken from `pipeline` (its VAE and schedule)."""

    data: str = "data/shapes-single"  # an image folder with metadata.jsonl
    pipeline: str = "default"  # the pipeline folder whose VAE encodes and whose schedule noises; "default": bundled
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    resolution: int = 64
    max_records: int | None = None  # None: every record
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 100
    output_dir: str = "runs/classifier"

    def __post_init__(self) -> None:
        for name in ("resolution", "steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def labelled_images(folder: str | Path, config: ClassifierTrainConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(images (N, 3, R, R) in [-1, 1], labels (N,), records skipped) from the folder's metadata.jsonl."""
    labels = config.model.labels

    def label_of(record: dict[str, Any]) -> int | None:
        value = metadata_value(record, config.model.attribute)
        return labels.index(value) if value in labels else None

    images, ys, skipped = folder_images(folder, config.resolution, config.max_records, label_of, "the classifier")
    if not ys:
        raise ConfigError(f"{Path(folder) / 'metadata.jsonl'}: no record has a value of {config.model.attribute!r} "
                          f"among model.labels {list(labels)} ({skipped} skipped)")
    return images, torch.tensor(ys), skipped


def train_classifier(config: ClassifierTrainConfig) -> dict[str, Any]:
    """Train and save the classifier; returns {"output_dir", "loss", "accuracy", "records", "skipped"} (loss and
    accuracy: the mean of the last log window, over t uniform)."""
    _, vae, schedule = pipeline_vae_schedule(config.pipeline, config.resolution)
    factor = vae.config.downsample_factor
    model_config = dataclasses.replace(config.model, in_channels=vae.config.latent_channels,
                                       sample_size=config.resolution // factor,
                                       num_train_timesteps=schedule.num_train_timesteps)
    images, labels, skipped = labelled_images(config.data, config)
    latents = encode(vae, images)  # (N, C, h, w)
    alphas_cumprod = schedule.alphas_cumprod()
    with seeded(config.seed):
        model = NoisyClassifier(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    window: list[tuple[float, float]] = []
    model.train()
    for step in range(1, config.steps + 1):
        idx, x_t, t = noisy_batch(latents, alphas_cumprod, config.batch_size, g)
        logits = model(x_t, t)
        loss = F.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append((float(loss.detach()), float((logits.argmax(1) == labels[idx]).float().mean())))
        if step % config.log_every == 0 or step == config.steps:
            mean_loss, accuracy = (sum(v) / len(window) for v in zip(*window, strict=True))
            logger.info("step %d: loss %.4f accuracy %.3f", step, mean_loss, accuracy)
            if step < config.steps:
                window = []
    if not math.isfinite(window[-1][0]):
        raise FloatingPointError("the classifier's loss is not finite: lower lr")
    out = Path(config.output_dir)
    model.eval().save_pretrained(out)
    mean_loss, accuracy = (sum(v) / len(window) for v in zip(*window, strict=True))
    result = {"output_dir": str(out), "loss": mean_loss, "accuracy": accuracy, "records": len(labels),
              "skipped": skipped}
    write_json({"config": to_dict(config), **result}, out / "training.json")
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m ldm.training.classifier --config train-classifier-shapes.yaml [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="python -m ldm.training.classifier",
                                     description="Train a noisy classifier for classifier guidance.")
    parser.add_argument("--config", required=True, help="YAML mirroring ClassifierTrainConfig (a bare name: bundled)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. steps=500 model.labels=[red,blue]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = load_train_config(ClassifierTrainConfig, config_path(args.config), args.overrides)
    result = train_classifier(config)
    logger.info("saved %s (accuracy %.3f on the last %d steps)", result["output_dir"], result["accuracy"],
                config.log_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
