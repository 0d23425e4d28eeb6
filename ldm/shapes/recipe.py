"""The recipe of the bundled default model (issue 7): every stage, its config, and one command that runs them all.

    python -m ldm.shapes.recipe --out runs/default                 # the whole recipe (ldm/configs/default-model.yaml)
    python -m ldm.shapes.recipe --out runs/default --resume        # continue after a stop, stage by stage
    python -m ldm.shapes.recipe --out runs/default --resume --export pipelines/default_model

Stages (each trains through the same code a user's data would go through):
  data    ldm.shapes.dataset.export_imagefolder: data/train (train split), data/test-held-out (held-out colour-shape pairs)
          and data/test-seen (fresh scenes of the train distribution, another seed), 64 x 64 imagefolders
  clip    ldm.training.clip: a small open_clip CLIP, contrastive (ClipLoss) -> clip/ (open_clip folder)
  vae     ldm.training.vae: KL autoencoder, 4 latent channels, f = 4 -> vae/ run, vae-export/ (diffusers vae/)
  init    the U-Net's seeded initial weights + trained VAE + the CLIP text tower as a CLIPTextModel -> init/
  unet    ldm.training.unet with model.pretrained = init/: frozen VAE latents (cached), the text encoder trained jointly,
          condition dropout, EMA -> unet/ run; then resumed with a longer LR horizon for each of unet_extend_to
  layout  a last U-Net phase from the unet run's EMA weights (unet-export/) on a layout-weighted data mix
          (data/train-layout: two-object scenes, every caption stating the relation) with the noisy timesteps,
          where the layout is decided, weighted up (objective.timestep_bias) -> unet-layout/ run (skipped when
          unet_layout is null or unet_layout.enabled is false)
  decoder ldm.training.vae with train_encoder=false: the VAE decoder fine-tuned from init/vae with the encoder
          frozen, so the latents the U-Net learned stay exactly the same -> vae-decoder/ run (skipped when
          vae_decoder is null)
  export  ldm.training.export (EMA U-Net, and the fine-tuned decoder's VAE) -> pipeline/, plus clip/ (image tower,
          logit scale, text projection)

Paths (data, run folders, the init folder) are set by the recipe under --out; the YAML holds hyperparameters only.
`seed` seeds the data, every initialisation and every training run. A finished stage leaves `<stage>.done`; with
--resume finished stages are skipped and training stages continue from their latest checkpoint. Before a stage runs,
the markers of every later stage are removed, so they run again (a training stage resumes its latest checkpoint: it
re-exports, it does not retrain); `layout.done` and `decoder.done` record whether the optional stage was skipped
(unet_layout null or not enabled, vae_decoder null), so switching one on or off re-runs it and the stages after it;
a training stage whose last checkpoint is short of the steps now configured (e.g. unet_extend_to raised) resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from autoencoder.latent_norm import fold_latent_standardization, latent_channel_stats
from autoencoder.model import AutoencoderKL
from ldm.training.vae import export_vae, train_vae
from ldm.config import save_config
from ldm.diffusion.schedule import sd_schedule, shift_snr
from ldm.io import write_json, write_text
from ldm.networks.unet import UNet
from ldm.shapes.negatives import hard_negative
from ldm.shapes.recipe_config import (
    OPTIONAL_STAGES,
    DEFAULT_CONFIG,
    STAGES,
    DefaultModelConfig,
    load_recipe,
)
from ldm.training.beside import Beside
from ldm.training.checkpoint import folder_digest, list_checkpoints
from ldm.training.clip import (
    clip_text_encoder,
    export_clip,
    load_clip,
    save_clip,
    train_clip,
)
from ldm.training.config import TrainConfig
from ldm.training.launch import launch_train
from ldm.training.unet import load_vae, train

logger = logging.getLogger(__name__)
# The init stage warns when the scaled latent channels' stds are further apart than this ratio (measured: 0.38-1.33
# on a VAE whose U-Net learned colour slowly, 0.87-1.01 on one whose U-Net learned it at once).
UNBALANCED_LATENTS = 2.0


# ------------------------------------------------------------------------------------------------------ stages


def stage_data(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    from ldm.shapes.dataset import export_imagefolder

    d = cfg.data
    splits = {"train": ("train", cfg.seed, d.n_train), "test-held-out": ("test", cfg.seed, d.n_test_held_out),
              "test-seen": ("train", cfg.seed + 1, d.n_test_seen)}
    for name, (split, seed, n) in splits.items():
        layouts = d.train_layouts if name == "train" else None
        export_imagefolder(out / "data" / name, n, split, seed, size=d.size, overwrite=True, layouts=layouts)
    return {name: n for name, (_, _, n) in splits.items()}


def stage_clip(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    result = train_clip(cfg.clip, negative_caption=hard_negative)
    export_clip(out / "clip", out / "clip-export")
    return {"step": result["step"], **_last_losses(out / "clip")}


def stage_vae(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    save_config(cfg.vae_model, out / "vae-model.yaml")
    result = train_vae(cfg.vae)
    export_vae(out / "vae", out / "vae-export")
    return {"step": result["step"], **_last_losses(out / "vae"), **_last_losses(out / "vae", "eval.csv")}


def stage_init(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    from ldm.loading.components import save_pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = UNet(cfg.unet_model)
    clip = load_clip(out / "clip-export")
    text = clip_text_encoder(clip, cfg.clip.model)
    vae = load_vae(out / "vae-export")
    images = calibration_images(out / "data" / "train", vae.config.sample_size)
    with torch.no_grad():
        mean, std = latent_channel_stats(vae, images, generator=torch.Generator().manual_seed(0))
    info: dict[str, Any] = {"latent_channel_mean": mean.tolist(), "latent_channel_std": std.tolist()}
    if cfg.latent_norm == "per_channel":
        fold_latent_standardization(vae, mean, std)
    else:
        vae.config.scaling_factor = latent_scaling_factor(vae, images)
        scaled = std * vae.config.scaling_factor
        info["latent_channel_std_scaled"] = scaled.tolist()
        if scaled.max() > UNBALANCED_LATENTS * scaled.min():
            logger.warning("the VAE's latent channels are unbalanced: stds after scaling %s (more than %gx apart); "
                           "the U-Net learns colour and shape much more slowly on such latents (docs/default-model-research.md)",
                           [round(v, 2) for v in scaled.tolist()], UNBALANCED_LATENTS)
    schedule = shift_snr(sd_schedule(), cfg.snr_shift)
    save_pipeline(out / "init", unet=unet, vae=vae, text_encoder=text, schedule=schedule)
    return {**parameter_counts(unet, vae, text, clip), "vae_scaling_factor": vae.config.scaling_factor, **info}


def calibration_images(folder: Path, size: int, n: int = 512) -> torch.Tensor:
    """The first n training images, in order, in [-1, 1]: what the latents' scale is measured on."""
    from ldm.training.data import DataConfig, build_dataloader

    loader, _ = build_dataloader(DataConfig(path=str(folder), resolution=size, shuffle=False, max_samples=n), 64)
    return torch.cat([b["pixel_values"] for b in loader])


@torch.no_grad()
def latent_scaling_factor(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """1 / std of z ~ q(z|x) over `images` (Rombach et al. 2022, sec. 4.3.2), 4 significant digits."""
    gen = torch.Generator().manual_seed(0)
    z = torch.cat([vae.encode(x).sample(gen) for x in images.split(64)])  # (n, C, h, w)
    return float(f"{1.0 / z.std().item():.4g}")


def stage_unet(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    """ldm.training.unet to unet.run.max_steps, then resumed to each of unet_extend_to (phases already passed are skipped)."""
    horizons = cfg.unet_horizons()
    for i, steps in enumerate(horizons):
        done = list_checkpoints(out / "unet" / "checkpoints")
        if i < len(horizons) - 1 and done and done[-1][0] >= steps:
            continue
        step = train_unet(cfg, replace(cfg.unet, run=replace(cfg.unet.run, max_steps=steps)))
    return {"step": step, **_last_losses(out / "unet")}


def train_unet(cfg: DefaultModelConfig, config: TrainConfig) -> int:
    """ldm.training.unet on `config` here, or in cfg.num_processes local processes (ldm.training.launch); returns the last step."""
    if cfg.num_processes == 1:
        return int(train(config)["step"])
    run = Path(config.run.output_dir)
    launch_train(config, cfg.num_processes, run.with_suffix(".launch.yaml"), threads_per_process=cfg.num_threads)
    return list_checkpoints(run / "checkpoints")[-1][0]


def stage_layout(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    """The unet run's EMA weights -> unet-export/; layout-weighted scenes (seed + 2) -> data/train-layout; ldm.training.unet
    from unet-export/ -> unet-layout/ run."""
    from ldm.shapes.dataset import export_imagefolder
    from ldm.training.export import export

    tune = cfg.unet_layout
    if not cfg.runs("layout"):
        return {"skipped": True}
    export(out / "unet", out / "unet-export", use_ema=True)  # same bytes on a resume: the unet stage is finished
    start, record = folder_digest(out / "unet-export"), out / "unet-layout.start.sha256"
    if record.is_file() and record.read_text() != start:
        raise RuntimeError(f"{out / 'unet-layout'} was started from another unet-export/ (the unet stage has trained "
                           "since): remove it and unet-layout.start.sha256 to run the layout stage again")
    export_imagefolder(out / "data" / "train-layout", tune.n_train, "train", cfg.seed + 2, size=cfg.data.size,
                       overwrite=True, layouts=tune.layouts, relation_stated=tune.relation_stated)
    write_text(start, record)
    step = train_unet(cfg, tune.unet)
    return {"skipped": False, "step": step, **_last_losses(out / "unet-layout")}


def stage_decoder(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    """Decoder-only fine-tuning of init/vae (the encoder frozen) -> vae-decoder/ run and vae-decoder-export/."""
    if not cfg.runs("decoder"):
        return {"skipped": True}
    result = train_vae(cfg.vae_decoder)
    run = out / "vae-decoder"
    export_vae(run, out / "vae-decoder-export")
    return {"skipped": False, "step": result["step"], **_last_losses(run), **_last_losses(run, "eval.csv")}


def stage_export(cfg: DefaultModelConfig, out: Path) -> dict[str, Any]:
    from ldm.training.export import export

    vae = AutoencoderKL.from_pretrained(out / "vae-decoder-export") if cfg.runs("decoder") else None
    unet_run = out / ("unet-layout" if cfg.runs("layout") else "unet")
    export(unet_run, out / "pipeline", use_ema=True, vae=vae)
    # The CLIP ships without its text tower (it is text_encoder/) unless the U-Net stage trained that one further.
    moved = cfg.unet.train_text_encoder or (cfg.runs("layout") and cfg.unet_layout.unet.train_text_encoder)
    save_clip(load_clip(out / "clip-export"), cfg.clip.model, out / "pipeline" / "clip", text=moved)
    return {"bytes": folder_bytes(out / "pipeline")}


def parameter_counts(unet: torch.nn.Module, vae: torch.nn.Module, text: torch.nn.Module,
                     clip: torch.nn.Module) -> dict[str, int]:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_params": count(unet), "vae_params": count(vae), "text_encoder_params": count(text),
            "clip_image_tower_params": count(clip.visual), "clip_params": count(clip)}


def folder_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _last_losses(run_dir: Path, name: str = "losses.csv") -> dict[str, float]:
    """The last logged row of a run's CSV (e.g. the final loss, the final PSNR)."""
    path = run_dir / name
    if not path.is_file():
        return {}
    rows = [r.split(",") for r in path.read_text().splitlines() if r]
    return {f"{name.removesuffix('.csv')}.{k}": float(v) for k, v in zip(rows[0][1:], rows[-1][1:])} if len(rows) > 1 \
        else {}


_RUN = {"data": stage_data, "clip": stage_clip, "vae": stage_vae, "init": stage_init, "unet": stage_unet,
        "layout": stage_layout, "decoder": stage_decoder, "export": stage_export}


def _marker(cfg: DefaultModelConfig, stage: str) -> str:
    """What `<stage>.done` holds: "skipped" for an optional stage that does not run (cfg.runs), else nothing."""
    return "skipped" if stage in OPTIONAL_STAGES and not cfg.runs(stage) else ""


def _planned_steps(cfg: DefaultModelConfig, stage: str) -> tuple[Path, int] | None:
    """A training stage's run folder and the steps the config asks of it (None: not a training stage, or skipped)."""
    runs = {"clip": cfg.clip, "vae": cfg.vae, "unet": cfg.unet}
    if cfg.runs("layout"):
        runs["layout"] = cfg.unet_layout.unet
    if cfg.runs("decoder"):
        runs["decoder"] = cfg.vae_decoder
    if stage not in runs:
        return None
    steps = cfg.unet_horizons()[-1] if stage == "unet" else runs[stage].run.max_steps
    return Path(runs[stage].run.output_dir), steps


def _finished(cfg: DefaultModelConfig, done: Path) -> bool:
    """The stage's marker exists and matches the config (an optional stage skipped or run as its section says), and
    a training stage's run reached the steps the config asks now (raising e.g. unet_extend_to resumes it)."""
    if not (done.is_file() and done.read_text() == _marker(cfg, done.stem)):
        return False
    planned = _planned_steps(cfg, done.stem)
    if planned is None:
        return True
    ckpts = list_checkpoints(planned[0] / "checkpoints")  # none left (cleaned up): the marker is taken as it is
    return not ckpts or ckpts[-1][0] >= planned[1]


def run_recipe(cfg: DefaultModelConfig, out: str | Path, *, resume: bool = False, stop_after: str | None = None,
               export_to: str | Path | None = None) -> dict[str, Any]:
    """Run the stages in order (skipping finished ones when resuming); returns and writes out/report.json."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "recipe.yaml")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    beside: Beside | None = None
    threads = torch.get_num_threads()
    try:
        for i, stage in enumerate(STAGES):
            done = out / f"{stage}.done"
            if not _finished(cfg, done):
                for later in STAGES[i + 1:]:  # their inputs may change: they run again, even after a stop
                    (out / f"{later}.done").unlink(missing_ok=True)
                if stage == "unet" and cfg.decoder_beside_unet and cfg.runs("decoder"):
                    logger.info("stage decoder, beside the U-Net")
                    beside = Beside(stage_decoder, (cfg, out), out / "decoder.beside.json")
                    torch.set_num_threads(max(1, threads - 1))
                logger.info("stage %s", stage)
                if stage == "decoder" and beside is not None:
                    info = {**beside.join(), "beside_unet": True}
                    beside, elapsed = None, info.pop("wall_s")  # the decoder process's own wall time
                    torch.set_num_threads(threads)
                else:
                    start = time.perf_counter()
                    info = _RUN[stage](cfg, out)
                    elapsed = time.perf_counter() - start
                # this run's numbers replace the last run's (no stale keys); the wall time is summed over re-runs
                wall = report.get(stage, {}).get("wall_s", 0.0) + elapsed
                report[stage] = {**info, "wall_s": wall}
                write_json(report, report_path)  # atomic: a stop mid-write leaves the last report
                write_text(_marker(cfg, stage), done)
            if stage == stop_after:
                break
        if beside is not None:  # stopped before the decoder stage: let it finish; a resume re-runs its (done) stage
            beside.join()
            beside = None
    finally:
        if beside is not None:
            beside.stop()
        torch.set_num_threads(threads)
    if export_to is not None and (out / "export.done").is_file():
        export_to = Path(export_to)
        if export_to.exists():
            shutil.rmtree(export_to)
        shutil.copytree(out / "pipeline", export_to)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.shapes.recipe", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder (data, checkpoints, exported pipeline)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML mirroring DefaultModelConfig")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run in --out")
    parser.add_argument("--stop-after", choices=STAGES, default=None, help="stop after this stage")
    parser.add_argument("--export", default=None, help="copy the exported pipeline folder here when done")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. unet.run.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_recipe(args.config, args.out, args.overrides)
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    report = run_recipe(cfg, args.out, resume=args.resume, stop_after=args.stop_after, export_to=args.export)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
