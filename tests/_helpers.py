"""Helpers shared by the tests: weight assertions, the tiny training config."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm.training.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# A tiny open_clip model config for the CLIP stage, the recipe and REPA
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def same_weights(a: torch.nn.Module | Mapping[str, torch.Tensor], b: torch.nn.Module | Mapping[str, torch.Tensor]) -> bool:
    """True when both hold exactly the same keys and bit-identical tensors (shapes must match too)."""
    a = a.state_dict() if isinstance(a, torch.nn.Module) else a
    b = b.state_dict() if isinstance(b, torch.nn.Module) else b
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def tiny_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    """ldm/configs/train-tiny.yaml shrunk for tests: 16 images of 32 px, batch 2 x 2 accumulation, 6 updates."""
    return [f"data.path={data}", f"run.output_dir={out}", f"run.max_steps={STEPS}", "run.batch_size=2",
            "optim.gradient_accumulation_steps=2", "run.checkpoint_every=2", "run.keep_last=10", "run.validate_every=0",
            "run.log_every=1", "run.progress_bar=false", "optim.warmup_steps=2", "ema.decay=0.9", *extra]


def tiny_config(data: Path, out: Path, *extra: str) -> TrainConfig:
    return load_train_config(TrainConfig, ROOT / "ldm/configs/train-tiny.yaml", tiny_overrides(data, out, *extra))


def kill_at_checkpoint(cmd: list[str], checkpoint: Path, *, timeout: float = 240) -> dict[str, str]:
    """Run `cmd` (from the repository root) until `checkpoint` exists, then SIGKILL it; returns the environment it ran
    in, for the resumed run. Fails naming the process's stderr if it exits first, or after `timeout` seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not checkpoint.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, f"no {checkpoint.name} within {timeout} s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return env


def save_tiny_folder(path: Path, seed: int = 0) -> Path:
    """The tiny text-to-image model (pipelines.tiny) written as a diffusers folder at `path`; returns it."""
    from ldm.loading.components import save_pipeline
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=seed)
    save_pipeline(path, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    return path
