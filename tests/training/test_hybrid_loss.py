"""`ldm train` with a variance head: objective.loss hybrid (L_simple + lambda L_vlb) and vlb (importance-sampled), a few
steps each; the importance sampler's history is checkpointed per process and a resumed run repeats the straight one
bit for bit; the exported folder is a learned_range DDPMScheduler folder; bad combinations are ConfigErrors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from ldm.config import BUNDLED_CONFIGS, ConfigError
from ldm.training.checkpoint import read_meta
from ldm.training.unet import train
from tests._helpers import tiny_config
from tests.training.test_train import assert_same_checkpoint


@pytest.fixture(scope="module")
def unet_8(tmp_path_factory) -> Path:
    """unet-tiny.yaml with 8 output channels: eps and a variance head for 4 latent channels."""
    config = yaml.safe_load((BUNDLED_CONFIGS / "unet-tiny.yaml").read_text())
    path = tmp_path_factory.mktemp("unet") / "unet-tiny-learned.yaml"
    path.write_text(yaml.safe_dump({**config, "out_channels": 8}))
    return path


def learned(shapes: Path, out: Path, unet: Path, loss: str, *extra: str):
    """train-tiny.yaml with the variance head and `loss` (vlb: without train-tiny's min-SNR weighting)."""
    no_min_snr = ("objective.min_snr_gamma=null",) if loss == "vlb" else ()
    return tiny_config(shapes, out, f"model.unet={unet}", "objective.variance=learned_range", f"objective.loss={loss}",
                       *no_min_snr, *extra)


# two timesteps, so the 24 samples of 6 updates warm the vlb importance sampler up (10 values of L_t per t) mid-run
TWO_STEPS = ("model.schedule.num_train_timesteps=2",)


def test_hybrid_objective_trains_and_exports_a_learned_range_ddpm_folder(shapes, unet_8, tmp_path):
    """Two updates of L_hybrid (objective.loss=vlb: the resume test below); the frozen/ folder export completes is a
    DDPMScheduler folder with variance_type learned_range and an 8-channel U-Net."""
    train(learned(shapes, tmp_path, unet_8, "hybrid", "run.max_steps=2", "run.checkpoint_every=2"))
    rows = list(csv.DictReader((tmp_path / "losses.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and math.isfinite(float(r["vlb_term"])) for r in rows)
    scheduler = json.loads((tmp_path / "frozen/scheduler/scheduler_config.json").read_text())
    assert scheduler["variance_type"] == "learned_range" and scheduler["_class_name"] == "DDPMScheduler"
    assert json.loads((tmp_path / "frozen/unet/config.json").read_text())["out_channels"] == 8


@pytest.mark.slow
def test_vlb_importance_sampler_state_resumes_bitwise(shapes, unet_8, tmp_path):
    """A straight 6-update vlb run (6 samples per update, a checkpoint after every one) and one resumed from its
    step-2 checkpoint end with bitwise equal weights, EMA, optimizer state and importance-sampler history. The history
    is warm (10 values of L_t for both t) after step 5, so step 6 draws t from sqrt(E[L_t^2]): a resume that lost the
    12 values of step 2 would still draw uniformly there, and end elsewhere."""
    straight = tmp_path / "straight"
    train(learned(shapes, straight, unet_8, "vlb", *TWO_STEPS, "run.checkpoint_every=1", "run.batch_size=3"))
    counts = [read_meta(straight / f"checkpoints/step-0000000{k}")["step_state"][0]["vlb_sampler"]["counts"]
              for k in range(1, 7)]
    # seeded draws: 12 values at step 2; warm after step 5 (a fresh sampler has 18 values by then: still uniform)
    assert counts[1] == [4, 8] and counts[4] == counts[5] == [10, 10], counts
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints/step-00000002", resumed / "checkpoints/step-00000002")
    train(learned(shapes, resumed, unet_8, "vlb", *TWO_STEPS, "run.checkpoint_every=1", "run.batch_size=3",
                  "run.resume=latest"))
    assert_same_checkpoint(straight / "checkpoints/step-00000006", resumed / "checkpoints/step-00000006")
    state = [read_meta(out / "checkpoints/step-00000006")["step_state"] for out in (straight, resumed)]
    assert state[0] == state[1]


def test_bad_objective_combinations_are_config_errors(shapes, unet_8, tmp_path):
    with pytest.raises(ConfigError, match="hybrid trains a variance head"):
        tiny_config(shapes, tmp_path, "objective.loss=hybrid")
    with pytest.raises(ConfigError, match="needs objective.loss=hybrid or vlb"):
        tiny_config(shapes, tmp_path, "objective.variance=learned_range")
    with pytest.raises(ConfigError, match="timestep_bias must be none"):
        tiny_config(shapes, tmp_path, "objective.loss=vlb", "objective.timestep_bias.strategy=later")
    with pytest.raises(ConfigError, match="min_snr_gamma must be null"):
        tiny_config(shapes, tmp_path, "objective.loss=vlb", "objective.min_snr_gamma=5")
    with pytest.raises(ConfigError, match="returns 4 .*valid: 8"):  # the bundled tiny U-Net has no variance head
        train(tiny_config(shapes, tmp_path / "a", "objective.variance=learned_range", "objective.loss=hybrid"))
