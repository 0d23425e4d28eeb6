"""A learned-variance version of the bundled model (Nichol & Dhariwal 2021, L_hybrid) by fine-tuning, not the 4 h
recipe: the bundled folder with the U-Net's conv_out widened to 2C outputs (the new variance rows zero, so v = 0 and
Sigma = sqrt(beta_t beta~_t), midway between beta_t and beta~_t in log space, eq. 15; the prediction rows unchanged,
so it samples exactly as the bundled model with a fixed variance), then `ldm train` with objective.variance =
learned_range, objective.loss = hybrid on the bundled data (ldm/configs/train-learned-variance-shapes.yaml).

    python -m ldm.shapes.learned_variance --out runs/learned-variance [--n-train 4000] [--resume] [key=value ...]

Stages, each skipped when its output exists: data/train (export_imagefolder: the recipe's train split, seed 0, 64 px),
init/ (`write_init_folder`), run/ (ldm.training.unet; --resume continues its latest checkpoint), pipeline/ (the EMA
U-Net, with the source folder's extra parts: clip/, classifier/, ...). docs/variances.md has the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from pathlib import Path

import torch

from ldm.diffusion.variances import is_learned
from ldm.loading.components import PIPELINE_SUBFOLDERS, load_pipeline_folder, save_pipeline
from ldm.loading.sources import DEFAULT_MODEL
from ldm.networks.unet import UNet
from ldm.training.variance_objective import objective_schedule

CONFIG = "train-learned-variance-shapes.yaml"
logger = logging.getLogger(__name__)


def widen_variance_head(unet: UNet) -> UNet:
    """A copy of `unet` returning 2C channels: conv_out's C prediction rows as they were, C new variance rows (weights
    and biases) zero, so the head outputs v = 0 everywhere. Every other weight is copied as it is."""
    c = unet.config.out_channels
    if c != unet.config.in_channels:
        raise ValueError(f"the U-Net already returns {c} channels for {unet.config.in_channels} inputs: widening needs "
                         "a fixed-variance U-Net (out_channels = in_channels)")
    wide = UNet(dataclasses.replace(unet.config, out_channels=2 * c)).to(unet.conv_out.weight.dtype)
    state = unet.state_dict()
    for key in ("conv_out.weight", "conv_out.bias"):
        state[key] = torch.cat([state[key], torch.zeros_like(state[key])])  # (2C, ...): [prediction; variance]
    wide.load_state_dict(state, strict=True)
    return wide.eval()


def drop_variance_head(unet: UNet) -> UNet:
    """The inverse of widen_variance_head: a copy returning only the C prediction channels (the same mean network
    with a fixed variance, e.g. to compare the head with beta~_t on the same weights)."""
    c = unet.config.in_channels
    if unet.config.out_channels != 2 * c:
        raise ValueError(f"the U-Net returns {unet.config.out_channels} channels for {c} inputs: no variance head "
                         "to drop (that needs out_channels = 2 * in_channels)")
    narrow = UNet(dataclasses.replace(unet.config, out_channels=c)).to(unet.conv_out.weight.dtype)
    state = unet.state_dict()
    for key in ("conv_out.weight", "conv_out.bias"):
        state[key] = state[key][:c].clone()
    narrow.load_state_dict(state, strict=True)
    return narrow.eval()


def copy_extra_parts(source: str | Path, dest: str | Path) -> list[str]:
    """Copy the subfolders of pipeline folder `source` that are not the five Stable Diffusion parts (the bundled
    model's clip/, classifier/, noisy_clip/: they read the VAE's latents, which a U-Net fine-tune leaves as they are)
    into `dest`, replacing them there; returns their names."""
    names = sorted(p.name for p in Path(source).iterdir() if p.is_dir() and p.name not in PIPELINE_SUBFOLDERS)
    for name in names:
        target = Path(dest) / name
        tmp = target.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(source) / name, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return names


def write_init_folder(out: str | Path, source: str | Path = DEFAULT_MODEL) -> Path:
    """The init folder of the fine-tune: `source` (a fixed-variance pipeline folder, by default the bundled model)
    with its U-Net widened (widen_variance_head) and a learned_range DDPMScheduler (the schedule otherwise as it
    was; ldm.training.variance_objective.objective_schedule), and its extra parts copied. Returns `out`."""
    parts = load_pipeline_folder(source)
    if is_learned(parts.schedule.variance_type):
        raise ValueError(f"{source} already has a learned variance (variance_type {parts.schedule.variance_type!r})")
    schedule, scheduler_config = objective_schedule("learned_range", parts.schedule, parts.scheduler_config)
    save_pipeline(out, unet=widen_variance_head(parts.unet), vae=parts.vae, text_encoder=parts.text_encoder,
                  schedule=schedule, scheduler_config=scheduler_config)
    copy_extra_parts(source, out)
    return Path(out)


def run(out: str | Path, *, n_train: int = 4000, resume: bool = False, overrides: list[str] | None = None,
        threads: int = 1) -> Path:
    """The four stages of the module docstring under `out`; returns out/pipeline."""
    from ldm.config import config_path
    from ldm.shapes.dataset import export_imagefolder
    from ldm.training.config import TrainConfig, load_train_config
    from ldm.training.export import export
    from ldm.training.unet import train

    torch.set_num_threads(threads)
    out = Path(out)
    data = out / "data" / "train"
    if not data.is_dir():
        logger.info("exporting %d training images to %s", n_train, data)
        export_imagefolder(data, n_train, "train", 0, size=64)
    if not (out / "init").is_dir():
        write_init_folder(out / "init")
    paths = [f"model.pretrained={out / 'init'}", f"data.path={data}", f"run.output_dir={out / 'run'}"]
    config = load_train_config(TrainConfig, config_path(CONFIG),
                               paths + list(overrides or []) + (["run.resume=latest"] if resume else []))
    train(config)
    export(out / "run", out / "pipeline", use_ema=config.ema.enabled)
    copy_extra_parts(out / "init", out / "pipeline")
    return out / "pipeline"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder: data/, init/, run/, pipeline/")
    parser.add_argument("--n-train", type=int, default=4000, help="training images to export (64 px)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="continue run/ from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides of {CONFIG}, e.g. run.max_steps=200")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = run(args.out, n_train=args.n_train, resume=args.resume, overrides=args.overrides, threads=args.threads)
    logger.info("wrote %s", folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
