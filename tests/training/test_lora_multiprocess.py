"""A LoRA run in 2 processes (`accelerate launch --multi_gpu`, gloo DDP on CPU) against 1 process at the same global
batch."""

from __future__ import annotations

import os
import subprocess

import pytest

from ldm.io import load_state_dict
from ldm.training.launch import free_port, launch_command
from ldm.training.unet import train
from tests._helpers import ROOT, tiny_config, tiny_overrides
from tests.training.test_lora import LORA

STEPS = 3


@pytest.mark.slow
def test_two_processes_train_the_same_lora_as_one(tmp_path):
    """2 processes x batch 2 vs 1 process x batch 4, 3 updates, LoRA on the U-Net and the text encoder (dropout 0:
    peft's dropout draws from each process's own RNG). Every slot sees the same record, timestep, noise and caption
    dropout (slot generators); DDP averages gradients instead of one batch mean, so only float summation order
    differs: the LoRA weights agree to 1e-5 absolute (lr 3e-3 moves them by ~1e-2 in 3 steps)."""
    from ldm.shapes.dataset import export_imagefolder

    data = export_imagefolder(tmp_path / "shapes", 16, "train", 0, size=32)
    extra = [f"run.max_steps={STEPS}", f"run.checkpoint_every={STEPS}", "optim.gradient_accumulation_steps=1",
             "run.cache_latents=false", *LORA]
    one, two = tmp_path / "one", tmp_path / "two"
    train(tiny_config(data, one, "run.batch_size=4", *extra))
    cmd = launch_command(ROOT / "ldm/configs/train-tiny.yaml", 2, "no", free_port(),
                         tiny_overrides(data, two, "run.batch_size=2", *extra))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    name = f"checkpoints/step-{STEPS:08d}"
    assert '"num_processes": 2' in (two / name / "meta.json").read_text()
    for part in ("unet", "text_encoder"):
        a = load_state_dict(one / name / f"{part}.safetensors")
        b = load_state_dict(two / name / f"{part}.safetensors")
        assert a.keys() == b.keys() and all("lora_" in k for k in a)
        err = max((a[k] - b[k]).abs().max().item() for k in a)
        moved = max(v.abs().max().item() for k, v in a.items() if "lora_B" in k)
        print(f"{part}: max |LoRA(2 processes) - LoRA(1 process)| = {err:.3g}, largest lora_B entry {moved:.3g}")
        assert err < 1e-5, err
        assert moved > 1e-3
