"""Fine-tuning: from a pretrained folder (the loss falls, the export loads in diffusers), from a single file as from
its folder, from the bundled model (the quick start), and an exported from-scratch run sampling as in diffusers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ldm.io import load_state_dict, save_state_dict
from ldm.training.config import TrainConfig, load_train_config
from ldm.training.unet import build_components, save_frozen, train
from tests._helpers import ROOT, same_weights, tiny_config

def make_pretrained(config: TrainConfig, folder: Path) -> None:
    """A diffusers-layout folder of seeded random components (what a fine-tune starts from)."""
    parts = build_components(config)
    save_frozen(folder, parts)
    save_state_dict(parts.unet.state_dict(), folder / "unet/diffusion_pytorch_model.safetensors")


@pytest.mark.slow
def test_finetune_loss_decreases_and_export_loads(shapes, tmp_path):
    """Fine-tune a pretrained folder for 40 updates at lr 1e-3: the mean loss of updates 31-40 is below 0.7 x that of
    updates 1-10 (windows of 10 logged batch means). The export loads in our loader and in diffusers."""
    pretrained = tmp_path / "pretrained"
    make_pretrained(tiny_config(shapes, tmp_path / "x"), pretrained)
    out = tmp_path / "run"
    config = load_train_config(TrainConfig, ROOT / "ldm/configs/train-finetune-example.yaml", [
        f"model.pretrained={pretrained}", f"data.path={shapes}", "data.resolution=32", "data.crop=center",
        "data.random_flip=false", f"run.output_dir={out}", "run.max_steps=40", "run.batch_size=4",
        "run.mixed_precision=no", "run.gradient_checkpointing=true", "run.num_workers=0", "run.checkpoint_every=40",
        "run.validate_every=40", "run.validation_steps=2", "run.validation_seeds=[0]", "run.log_every=1",
        "run.progress_bar=false", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.gradient_accumulation_steps=1",
        "ema.decay=0.9"])
    train(config)
    losses = [float(r["loss"]) for r in csv.DictReader((out / "losses.csv").open())]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert len(losses) == 40 and last < 0.7 * first, (first, last)
    assert (out / "validation/step-00000040.png").is_file()

    from diffusers import StableDiffusionPipeline

    from ldm.training.export import export
    from ldm.loading.components import load_pipeline_folder

    folder = export(out, tmp_path / "exported")
    ours = load_pipeline_folder(folder)
    ema = load_state_dict(out / "checkpoints/step-00000040/unet.ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in ours.unet.state_dict().items())
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    x, t, c = torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        err = (pipe.unet(x, t, encoder_hidden_states=c).sample - ours.unet(x, t, encoder_hidden_states=c)).abs().max()
    assert err < 1e-5, err


def test_finetune_starts_from_a_single_file_as_from_its_folder(shapes, tmp_path):
    """model.pretrained may be anything Pipeline.from_pretrained loads: the same model as a pipeline folder and as a
    single .safetensors checkpoint builds bit-identical components, and 2 updates from each give identical weights."""
    from ldm.loading.components import load_pipeline_folder
    from ldm.loading.single_file import save_single_file
    from ldm.training.unet import build_components

    folder, file = tmp_path / "pretrained", tmp_path / "pretrained.safetensors"
    make_pretrained(tiny_config(shapes, tmp_path / "x"), folder)
    save_single_file(load_pipeline_folder(folder), file)
    runs = {}
    for name, source in (("folder", folder), ("file", file)):
        config = load_train_config(TrainConfig, ROOT / "ldm/configs/train-finetune-example.yaml", [
            f"model.pretrained={source}", f"data.path={shapes}", "data.resolution=32", "data.crop=center",
            "data.random_flip=false", f"run.output_dir={tmp_path / name}", "run.max_steps=2", "run.batch_size=2",
            "run.mixed_precision=no", "run.num_workers=0", "run.checkpoint_every=2", "run.validate_every=0",
            "run.progress_bar=false", "optim.warmup_steps=0", "optim.gradient_accumulation_steps=1"])
        parts = build_components(config)
        runs[name] = parts
        train(config)
    a, b = runs["folder"], runs["file"]
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(a, part), getattr(b, part)), part
    assert a.schedule == b.schedule
    trained = [load_state_dict(tmp_path / n / "checkpoints/step-00000002/unet.safetensors") for n in ("folder", "file")]
    assert same_weights(*trained)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"])
def test_an_exported_from_scratch_run_samples_as_in_diffusers(exported_tiny_run, sampler):
    """train-tiny.yaml's schedule names no steps_offset (0); the export records 1, which diffusers' pipeline would
    impose, so every sampler with a diffusers scheduler gives diffusers' image within 1/255."""
    from diffusers import StableDiffusionPipeline

    from pipelines.text_to_image import Pipeline
    from tests.pipelines._parity import ALL_SAMPLER_SCHEDULERS, _compare_with_diffusers

    ours = Pipeline.from_pretrained(exported_tiny_run, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(exported_tiny_run, safety_checker=None,
                                                     requires_safety_checker=False)
    assert ours.schedule.steps_offset == 1 == theirs.scheduler.config.steps_offset
    _compare_with_diffusers(ours, theirs, sampler, dict(ALL_SAMPLER_SCHEDULERS)[sampler])


@pytest.fixture(scope="module")
def exported_tiny_run(tmp_path_factory):
    from ldm.shapes.dataset import export_imagefolder
    from ldm.training.export import export

    tmp = tmp_path_factory.mktemp("exported")
    export_imagefolder(tmp / "data", 8, "train", 0, size=32)
    config = tiny_config(tmp / "data", tmp / "run", "run.max_steps=2")
    assert config.model.schedule.steps_offset == 0  # the YAML does not name it
    train(config)
    return export(tmp / "run", tmp / "exported")


def test_the_quickstart_config_fine_tunes_the_bundled_model(tmp_path):
    """train-quickstart.yaml starts from the bundled model ("default": its U-Net, VAE and text encoder), so what a
    newcomer trains first is a working model, not noise; 2 updates run on 64 px shapes."""
    from ldm.shapes.dataset import export_imagefolder
    from ldm.training.unet import build_components
    from ldm.loading.sources import load_components

    export_imagefolder(tmp_path / "data", 8, "train", 0, size=64)
    config = load_train_config(TrainConfig, "train-quickstart.yaml", [
        f"data.path={tmp_path / 'data'}", f"run.output_dir={tmp_path / 'run'}", "run.max_steps=2", "run.batch_size=2",
        "run.checkpoint_every=2", "run.validate_every=0", "run.progress_bar=false"])
    parts, bundled = build_components(config), load_components("default")
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(parts, part), getattr(bundled, part)), part
    assert parts.schedule == bundled.schedule
    train(config)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "meta.json").is_file()
