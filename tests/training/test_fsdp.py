"""FSDP2 (torch's fully_shard) through `accelerate launch --use_fsdp --fsdp_version 2` in 2 CPU processes (gloo), for
the full fine-tune and for LoRA: it trains (as one process at the same global batch), checkpoints full tensors,
resumes bit for bit and exports."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ldm.io import load_state_dict
from ldm.training.checkpoint import read_meta
from ldm.training.export import export, export_lora
from ldm.training.fsdp import fsdp_requested
from ldm.training.launch import free_port, launch_command
from ldm.training.unet import train
from tests._helpers import ROOT, STEPS, tiny_config, tiny_overrides
from tests.training.test_lora import LORA
from tests.training.test_train import assert_same_checkpoint

MODES = {"full": [], "lora": LORA}


def launch_fsdp(data: Path, out: Path, *extra: str) -> None:
    """`accelerate launch --use_fsdp --fsdp_version 2 --num_processes 2 -m ldm.training.unet` on the tiny config."""
    cmd = launch_command(ROOT / "ldm/configs/train-tiny.yaml", 2, "no", free_port(), tiny_overrides(data, out, *extra))
    at = cmd.index("--multi_gpu")
    cmd[at:at + 1] = ["--use_fsdp", "--fsdp_version", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]


def test_fsdp_is_asked_for_by_accelerate_launch():
    assert fsdp_requested({"ACCELERATE_USE_FSDP": "true"}) and not fsdp_requested({})


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp_trains_checkpoints_resumes_and_exports(mode, shapes, tmp_path):
    """2 FSDP processes x batch 2 (x 2 accumulation) for 6 updates: every checkpoint holds full tensors with the keys
    of a 1-process run (4 x 2), and its weights, EMA and AdamW moments agree with that run to 1e-5 absolute (only the
    gradient reduction order differs; measured ~1e-8); resuming the step-4 checkpoint in 2 new FSDP processes ends
    bit for bit on the uninterrupted run; the checkpoint exports (a LoRA file / a pipeline folder)."""
    extra = [*MODES[mode], "run.validate_every=3", "run.validation_steps=2"]  # validation runs in both processes
    straight = tmp_path / "fsdp"
    launch_fsdp(shapes, straight, *extra)
    final = straight / f"checkpoints/step-{STEPS:08d}"
    assert read_meta(final)["fsdp"] is True and read_meta(final)["num_processes"] == 2
    assert (straight / f"validation/step-{STEPS:08d}.png").is_file()
    one = tmp_path / "one"
    train(tiny_config(shapes, one, "run.batch_size=4", *extra))
    reference = one / f"checkpoints/step-{STEPS:08d}"
    parts = ("unet", "text_encoder") if mode == "lora" else ("unet",)
    for name in [f"{p}{suffix}.safetensors" for p in parts for suffix in ("", ".ema")]:
        a, b = load_state_dict(reference / name), load_state_dict(final / name)
        assert a.keys() == b.keys()
        err = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{mode} {name}: max |FSDP 2 processes - 1 process| = {err:.3g}")
        assert err < 1e-5
    for part in parts:
        oa, ob = (torch.load(p / f"{part}.optim.pt", weights_only=True)["optimizer"] for p in (reference, final))
        assert oa["state"].keys() == ob["state"].keys()
        for k, slots in oa["state"].items():
            assert (slots["exp_avg"] - ob["state"][k]["exp_avg"]).abs().max() < 1e-5
            assert type(ob["state"][k]["exp_avg"]) is torch.Tensor  # gathered, not a DTensor
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints/step-00000004", resumed / "checkpoints/step-00000004")
    launch_fsdp(shapes, resumed, *extra, "run.resume=latest")
    assert_same_checkpoint(final, resumed / f"checkpoints/step-{STEPS:08d}", parts=parts)
    if mode == "lora":
        from ldm.lora.weights import read_lora_file

        got = read_lora_file(export_lora(straight, tmp_path / "lora.safetensors"))
        ema = load_state_dict(final / "unet.ema.safetensors")
        assert all(torch.equal(got["unet." + k.removesuffix(".lora_A.weight")].down, v)
                   for k, v in ema.items() if k.endswith(".lora_A.weight"))
    else:
        from pipelines.text_to_image import Pipeline

        pipe = Pipeline.from_pretrained(export(straight, tmp_path / "pipeline"), device="cpu", dtype=torch.float32)
        ema = load_state_dict(final / "unet.ema.safetensors")
        assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in ema.items())
