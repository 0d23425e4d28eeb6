"""`accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun + gloo DDP) against one process with the same
global batch."""

from __future__ import annotations

import os
import subprocess

import pytest

from ldm.io import load_state_dict
from ldm.training.launch import free_port, launch_command
from ldm.training.unet import train
from tests.training.test_train import ROOT, tiny_config, tiny_overrides

STEPS = 3


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """2 processes x batch 2 vs 1 process x batch 4, 3 updates: the same records, timesteps, noise and dropout per
    global slot (ldm.training.checkpoint.slot_generators), gradients averaged by DDP instead of one batch mean. Only float
    summation order differs, so weights agree to 1e-5 absolute (AdamW at lr 3e-4 moves weights by ~1e-3 in 3 steps;
    measured: 1.7e-7 on CPU)."""
    from ldm.shapes.dataset import export_imagefolder

    data = export_imagefolder(tmp_path / "shapes", 16, "train", 0, size=32)
    extra = [f"run.max_steps={STEPS}", f"run.checkpoint_every={STEPS}", "optim.gradient_accumulation_steps=1",
             "run.cache_latents=false"]
    one = tmp_path / "one"
    train(tiny_config(data, one, "run.batch_size=4", *extra))
    two = tmp_path / "two"
    cmd = launch_command(ROOT / "ldm/configs/train-tiny.yaml", 2, "no", free_port(),
                         tiny_overrides(data, two, "run.batch_size=2", *extra))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    name = f"checkpoints/step-{STEPS:08d}"
    meta_one = (one / name / "meta.json").read_text()
    assert '"num_processes": 1' in meta_one and '"num_processes": 2' in (two / name / "meta.json").read_text()
    a = load_state_dict(one / name / "unet.safetensors")
    b = load_state_dict(two / name / "unet.safetensors")
    err = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |weights(2 processes) - weights(1 process)| = {err:.3g}")
    assert err < 1e-5, err
    assert a.keys() == b.keys()


def test_one_process_of_several_asked_for_is_told_so():
    """accelerate's simple launcher (`accelerate launch --cpu --num_processes 2`) sets MASTER_PORT and starts one
    process: the training warns; torchrun's processes (WORLD_SIZE set) and a plain run do not."""
    import warnings

    import pytest

    from ldm.training.config import warn_if_one_of_several

    with pytest.warns(UserWarning, match="started this one alone"):
        assert warn_if_one_of_several(1, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                                          "ACCELERATE_USE_CPU": "True"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_one_of_several(1, {})
        assert not warn_if_one_of_several(1, {"MASTER_PORT": "29500"})  # e.g. a SLURM script, not accelerate
        assert not warn_if_one_of_several(2, {"MASTER_PORT": "29500", "WORLD_SIZE": "2"})
