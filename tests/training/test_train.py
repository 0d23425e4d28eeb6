"""Latent-diffusion training: bitwise resume (in process and after SIGKILL), loss decrease on a fine-tune, export."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.training.checkpoint import list_checkpoints, load_checkpoint
from ldm.config import ConfigError
from ldm.io import load_state_dict, save_state_dict
from ldm.training.unet import build_components, render_grid, train
from ldm.training.config import load_train_config
from tests._helpers import STEPS, kill_at_checkpoint, tiny_config, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory) -> Path:
    """An uninterrupted 6-update run with checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_config(shapes, out))
    return out


def assert_same_checkpoint(a: Path, b: Path, parts: tuple[str, ...] = ("unet",)) -> None:
    """Bitwise equal weights, EMA weights, optimizer state, LR schedule (of every part) and data position."""
    for part in parts:
        for name in (f"{part}.safetensors", f"{part}.ema.safetensors"):
            sa, sb = load_state_dict(a / name), load_state_dict(b / name)
            assert sa.keys() == sb.keys()
            bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
            assert not bad, f"{name}: {len(bad)} tensors differ, e.g. {bad[0]} max |diff| {(sa[bad[0]] - sb[bad[0]]).abs().max()}"
        oa, ob = (torch.load(p / f"{part}.optim.pt", weights_only=True) for p in (a, b))
        assert oa["lr_scheduler"] == ob["lr_scheduler"]
        for k, state in oa["optimizer"]["state"].items():
            for key, value in state.items():
                assert torch.equal(value, ob["optimizer"]["state"][k][key])
    ma, mb = (load_checkpoint.__globals__["read_meta"](p) for p in (a, b))
    assert ma["data"] == mb["data"] and ma["ema"] == mb["ema"] and ma["step"] == mb["step"] == STEPS


@pytest.mark.slow
def test_straight_run_writes_checkpoints_and_log(straight):
    assert [s for s, _ in list_checkpoints(straight / "checkpoints")] == [2, 4, 6]
    rows = list(csv.DictReader((straight / "losses.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert all(float(r["skipped"]) == 0 and 0 < float(r["loss"]) < 10 for r in rows)
    # 6 updates x 2 micro-batches x 2 images = 24 of 16 records: the data position wrapped into epoch 1
    meta = load_checkpoint.__globals__["read_meta"](straight / "checkpoints/step-00000006")
    assert meta["data"]["epoch"] == 1 and meta["data"]["index"] == 8


@pytest.mark.slow
def test_cached_latents_stop_image_decoding_and_leave_the_run_unchanged(shapes, tmp_path, monkeypatch):
    """run.cache_latents (train-tiny.yaml): once all 16 records are cached, no image is opened again; the weights are
    those of the same run that goes on decoding every image (26 opens: the 24 samples of 6 updates and the micro-batch
    accelerate's loader reads ahead)."""
    import ldm.training.data

    opened: list = []  # the records' image entries
    real = ldm.training.data.open_image
    monkeypatch.setattr(ldm.training.data, "open_image", lambda path, *a, **k: (opened.append(path), real(path, *a, **k))[1])
    train(tiny_config(shapes, tmp_path / "a"))
    assert len(opened) == len({repr(p) for p in opened}) == 16
    opened.clear()
    monkeypatch.setattr(ldm.training.data.CaptionedImages, "images", property(lambda self: True, lambda self, value: None),
                        raising=False)
    train(tiny_config(shapes, tmp_path / "b"))
    assert len(opened) == 26
    assert_same_checkpoint(tmp_path / "a/checkpoints/step-00000006", tmp_path / "b/checkpoints/step-00000006")


@pytest.mark.slow
def test_resume_is_bitwise_equal(straight, shapes, tmp_path):
    """Resume from the step-2 checkpoint of the straight run: steps 3..6 reproduce it bit for bit (CPU)."""
    out = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints/step-00000002", out / "checkpoints/step-00000002")
    train(tiny_config(shapes, out, "run.resume=latest"))
    assert_same_checkpoint(straight / "checkpoints/step-00000006", out / "checkpoints/step-00000006")
    rows_a = list(csv.DictReader((straight / "losses.csv").open()))
    rows_b = list(csv.DictReader((out / "losses.csv").open()))
    assert [r["loss"] for r in rows_a[2:]] == [r["loss"] for r in rows_b]


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_same_weights(straight, shapes, tmp_path):
    """SIGKILL a training subprocess after its first checkpoint; no corrupt checkpoint is left, and resuming in a new
    process finishes with weights bitwise equal to the uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ldm.training.unet", "--config", str(ROOT / "ldm/configs/train-tiny.yaml"),
           *tiny_overrides(shapes, out, "run.checkpoint_every=1")]
    env = kill_at_checkpoint(cmd, out / "checkpoints/step-00000003")
    done = list_checkpoints(out / "checkpoints")
    assert done and done[-1][0] < STEPS, "the run finished before it was killed"
    for _, path in done:  # every visible checkpoint is complete and loads
        assert {"meta.json", "unet.safetensors", "unet.ema.safetensors", "unet.optim.pt", "rng-0.pt"} <= {
            p.name for p in path.iterdir()}
        load_state_dict(path / "unet.safetensors")
    result = subprocess.run([*cmd, "--resume", "latest"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_checkpoint(straight / "checkpoints/step-00000006", out / "checkpoints/step-00000006")


@pytest.mark.slow
def test_joint_text_encoder_training_resumes_bitwise_and_exports_the_trained_encoder(straight, shapes, tmp_path):
    """train_text_encoder: checkpoints hold a second part, text_encoder, whose weights move away from frozen/'s
    (the initial ones, the same seeded init as the frozen run's, whose checkpoints hold the U-Net only); resuming at step 2 reproduces step 6
    bit for bit for both parts; the export carries the EMA text encoder (frozen/'s is left as it was); resuming it
    without train_text_encoder is refused naming the parts."""
    from ldm.training.checkpoint import read_meta
    from ldm.loading.components import load_pipeline_folder
    from ldm.io import WeightsError
    from ldm.training.export import export

    def frozen_text(folder: Path) -> dict[str, torch.Tensor]:
        return load_pipeline_folder(folder, unet_weights=False).text_encoder.state_dict()

    out = tmp_path / "joint"
    extra = ("train_text_encoder=true", "text_encoder_lr=3e-3", "run.validate_every=3", "run.validation_steps=2")
    train(tiny_config(shapes, out, *extra))
    final = out / "checkpoints/step-00000006"
    assert read_meta(final)["parts"] == ["unet", "text_encoder"]
    initial = frozen_text(out / "frozen")
    trained, ema = (load_state_dict(final / f"text_encoder{s}.safetensors") for s in ("", ".ema"))
    assert trained.keys() == ema.keys() == initial.keys()
    still = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not still, still
    assert read_meta(straight / "checkpoints/step-00000006")["parts"] == ["unet"]
    frozen_run = frozen_text(straight / "frozen")
    assert all(torch.equal(frozen_run[k], initial[k]) for k in initial)  # same seeded init in both runs
    assert (out / "validation/step-00000006.png").is_file()

    resumed = tmp_path / "joint-resumed"
    shutil.copytree(out / "checkpoints/step-00000002", resumed / "checkpoints/step-00000002")
    train(tiny_config(shapes, resumed, *extra, "run.resume=latest"))
    assert_same_checkpoint(final, resumed / "checkpoints/step-00000006", ("unet", "text_encoder"))

    folder = export(out, tmp_path / "exported")
    exported = load_pipeline_folder(folder).text_encoder.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not all(torch.equal(exported[k], initial[k]) for k in initial)
    with pytest.raises(WeightsError, match=r"holds parts \['unet', 'text_encoder'\], this run trains \['unet'\]"):
        train(tiny_config(shapes, out, "run.resume=latest", "run.max_steps=8"))


def test_validation_grid_shape(shapes, tmp_path):
    parts = build_components(tiny_config(shapes, tmp_path))
    grid = render_grid(parts, parts.unet.eval(), ["a red circle", "a blue square"], [0, 1, 2], size=32, steps=2,
                       guidance_scale=3.0)
    assert grid.size == (3 * 32, 2 * 32) and grid.mode == "RGB"


def test_a_timestep_bias_beyond_the_schedule_stops_before_anything_is_written(shapes, tmp_path):
    """begin/end are checked against the schedule's T only once the model is built, but before frozen/ is written."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"objective.timestep_bias: .*range \[900, 1200\) must lie within"):
        train(tiny_config(shapes, out, "objective.timestep_bias.strategy=range", "objective.timestep_bias.begin=900",
                          "objective.timestep_bias.end=1200"))
    assert not (out / "frozen").exists()


def test_fresh_run_into_a_used_output_dir_is_refused(straight, shapes):
    """A new run (no run.resume) into a folder holding another run's frozen/ and checkpoints/ stops before training."""
    before = sorted(p.name for p in (straight / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match=r"frozen/ and checkpoints/.*run\.resume=latest"):
        train(tiny_config(shapes, straight))
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == before


def test_frozen_digest_is_recorded_and_checked_on_resume_and_export(straight, shapes, tmp_path):
    """meta.json's frozen_sha256 is the digest of frozen/; after frozen/'s VAE changes, resume and export refuse."""
    from ldm.training.checkpoint import folder_digest, read_meta
    from ldm.io import WeightsError
    from ldm.training.export import export

    digest = folder_digest(straight / "frozen")
    assert [read_meta(p)["frozen_sha256"] for _, p in list_checkpoints(straight / "checkpoints")] == [digest] * 3
    export(straight, tmp_path / "ok")  # unchanged: exports
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    vae_file = run / "frozen/vae/diffusion_pytorch_model.safetensors"
    state = load_state_dict(vae_file)
    key = sorted(state)[0]
    state[key] = state[key] + 1.0  # another run's VAE, same config
    save_state_dict(state, vae_file)
    with pytest.raises(WeightsError, match="frozen_sha256"):
        export(run, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="not the frozen"):
        train(tiny_config(shapes, run, "run.resume=latest"))


def test_validation_starts_from_the_pipelines_vp_prior(shapes, tmp_path, monkeypatch):
    """render_grid and Pipeline hand the sampler the same initial latent eps * sqrt(1 + sigma_max^2) for a seed
    (rtol 1e-6; the VE start eps * sigma_max differs by sqrt(1 + 1/sigma_max^2) - 1 = 2.3e-3), and the same image
    (max difference 1/255: uint8 rounding of the grid)."""
    import dataclasses

    import pipelines.text_to_image as t2i
    from ldm.diffusion.samplers import SAMPLERS
    from ldm.random import randn

    parts = build_components(tiny_config(shapes, tmp_path))
    starts = []

    def spy(original):
        def wrapped(model, x, sigmas, *args, **kwargs):
            starts.append((x.detach().clone(), float(sigmas[0])))
            return original(model, x, sigmas, *args, **kwargs)
        return wrapped

    euler = SAMPLERS["euler"]  # both take their sigmas and function from the table entry
    monkeypatch.setitem(SAMPLERS, "euler", dataclasses.replace(euler, fn=spy(euler.fn)))
    grid = render_grid(parts, parts.unet.eval(), ["a red circle"], [3], size=32, steps=2, guidance_scale=3.0)
    pipe = t2i.Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.schedule, device="cpu", dtype=torch.float32)
    image = pipe("a red circle", sampler="euler", num_inference_steps=2, guidance_scale=3.0, seed=3, height=32,
                 width=32, output_type="pt", progress=False).images
    (x_grid, sigma_max), (x_pipe, _) = starts
    eps = randn((1, 4, 4, 4), torch.Generator().manual_seed(3))
    torch.testing.assert_close(x_grid, eps * (1 + sigma_max**2) ** 0.5, rtol=1e-6, atol=0)
    torch.testing.assert_close(x_grid, x_pipe, rtol=1e-6, atol=0)
    assert (1 + 1 / sigma_max**2) ** 0.5 - 1 > 1e-3
    pixels = torch.tensor(np.array(grid)).permute(2, 0, 1).float()
    assert (pixels - image[0].float() * 255).abs().max() <= 1.0


# ---------------------------------------------------------------------------------------------------------- VAE


def test_psnr_closed_form():
    """A constant error e on pixels in [-1, 1]: PSNR = 10 log10(4 / e^2) (e = 0.1 -> 26.0206 dB)."""
    from ldm.training.vae import psnr

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(psnr(x, x + 0.1), torch.full((2,), 10 * torch.log10(torch.tensor(400.0)).item()), atol=1e-4)


@pytest.mark.slow
def test_vae_training_resumes_bitwise_and_exports(shapes, tmp_path):
    """4 VAE updates with the discriminator switched on at update 2: resuming from update 2 reproduces update 4
    bitwise; PSNR is logged; the export loads as an AutoencoderKL with the EMA weights."""
    from ldm.training.vae import VAETrainConfig, build_vae, export_vae, train_vae

    def cfg(out, *extra):
        return load_train_config(VAETrainConfig, ROOT / "ldm/configs/vae-train-tiny.yaml", [
            f"data.path={shapes}", f"eval_data.path={shapes}", "eval_data.max_samples=4", f"run.output_dir={out}",
            "run.max_steps=4", "run.batch_size=2", "loss.disc_start=2", "run.validate_every=4", "run.checkpoint_every=2",
            "run.log_every=1", "run.progress_bar=false", *extra])

    train_vae(cfg(tmp_path / "a"))
    shutil.copytree(tmp_path / "a/checkpoints/step-00000002", tmp_path / "b/checkpoints/step-00000002")
    train_vae(cfg(tmp_path / "b", "run.resume=latest"))
    for name in ("vae.safetensors", "vae.ema.safetensors", "discriminator.safetensors"):
        sa, sb = (load_state_dict(tmp_path / r / "checkpoints/step-00000004" / name) for r in "ab")
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    rows = list(csv.DictReader((tmp_path / "a/eval.csv").open()))
    assert len(list(csv.DictReader((tmp_path / "a/losses.csv").open()))) == 4
    assert [r["step"] for r in rows] == ["4"] and 0 < float(rows[0]["psnr"]) < 60
    folder = export_vae(tmp_path / "a", tmp_path / "vae")
    vae = build_vae(load_train_config(VAETrainConfig, None, base={
        "model": {"pretrained": str(folder)}, "data": {"path": str(shapes)}}).model)
    ema = load_state_dict(tmp_path / "a/checkpoints/step-00000004/vae.ema.safetensors")
    assert all(torch.equal(v, ema["vae." + k]) for k, v in vae.state_dict().items())


def test_vae_training_survives_a_micro_batch_of_only_unreadable_images(shapes, tmp_path):
    """Images 0 and 1 corrupt, no shuffling, batch 2: update 1 sees an empty micro-batch (pixel_values (0, 3, 0, 0)),
    which the shared loop turns into a zero loss counted as 2 skipped; update 2 trains on images 2, 3."""
    from ldm.training.vae import VAETrainConfig, train_vae

    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    records = (data / "metadata.jsonl").read_text().splitlines()[:4]
    (data / "metadata.jsonl").write_text("\n".join(records) + "\n")
    for name in ("000000.png", "000001.png"):
        (data / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "run"
    train_vae(load_train_config(VAETrainConfig, ROOT / "ldm/configs/vae-train-tiny.yaml", [
        f"data.path={data}", "data.shuffle=false", "eval_data=null", f"run.output_dir={out}", "run.max_steps=2",
        "run.batch_size=2", "run.num_workers=0", "run.checkpoint_every=2", "run.log_every=1", "run.validate_every=0",
        "run.progress_bar=false", "data.max_unreadable_fraction=0.5"]))  # 2 of 4 unreadable: let it train
    rows = list(csv.DictReader((out / "losses.csv").open()))
    assert [(r["step"], float(r["loss"]), float(r["skipped"])) for r in rows[:1]] == [("1", 0.0, 2.0)]
    assert rows[1]["step"] == "2" and float(rows[1]["loss"]) > 0 and float(rows[1]["skipped"]) == 0
    weights = load_state_dict(out / "checkpoints/step-00000002/vae.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())



def test_a_run_refused_for_its_data_leaves_nothing_behind(shapes, tmp_path):
    """Missing data is refused before anything is written (a retry is not blocked as 'another run'), and the message
    says how to make the shapes data there."""
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"image folder not found: .*missing.*export_imagefolder\("):
        train(tiny_config(tmp_path / "missing", out))
    assert not (out / "frozen").exists() and not (out / "checkpoints").exists()
    train(tiny_config(shapes, out, "run.max_steps=2"))  # the retry with the data starts as a fresh run
    assert (out / "checkpoints" / "step-00000002" / "meta.json").is_file()
