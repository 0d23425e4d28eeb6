"""Export a training checkpoint as a diffusers-format pipeline folder (safetensors) that our loader
(pipelines.Pipeline.from_pretrained) and diffusers' StableDiffusionPipeline.from_pretrained both read.

A checkpoint holds the trained U-Net (raw and EMA weights), and the text encoder too when it was trained jointly
(train_text_encoder); the frozen parts (VAE, text encoder, tokenizer, noise schedule) and the U-Net config live once
per run in `<output_dir>/frozen/`, named by the checkpoint's meta.json.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from autoencoder.model import AutoencoderKL
from ldm.training.checkpoint import folder_digest, latest_checkpoint, load_weights_only, read_meta
from ldm.io import WeightsError, load_weights
from ldm.loading.components import load_pipeline_folder, save_pipeline
from ldm.training.super_resolution import export_upscaler


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint folder; else the latest complete checkpoint of RUN/checkpoints/latest
    (the name `run.resume=latest` uses; no folder of that name exists), of a checkpoints/ folder, or of a run folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if path.name == "latest" and not path.exists():
        folder = path.parent
    elif path.name == "checkpoints" or not (path / "checkpoints").is_dir():
        folder = path
    else:
        folder = path / "checkpoints"
    latest = latest_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint folder (meta.json), RUN/checkpoints/latest, nor a run "
                                "or checkpoints/ folder with a complete checkpoint")
    return latest


def check_same_latents(trained: AutoencoderKL, other: AutoencoderKL, what: str) -> None:
    """Refuse `other` in place of `trained` (the VAE a U-Net learned the latents of) unless it encodes identically."""
    # Only the decoder may differ (decoder-only fine-tuning): every config field but force_upcast, a precision hint,
    # and every encoder / quant_conv tensor, both ways, so an added quant_conv or encoder attention is caught too.
    for f in dataclasses.fields(trained.config):
        mine, theirs = getattr(trained.config, f.name), getattr(other.config, f.name)
        if f.name != "force_upcast" and mine != theirs:
            raise WeightsError(f"{what}: config {f.name} is {theirs!r}, but the U-Net was trained with {mine!r}")
    prefixes = ("encoder.", "quant_conv.")
    mine = {k: v for k, v in trained.state_dict().items() if k.startswith(prefixes)}
    theirs = {k: v for k, v in other.state_dict().items() if k.startswith(prefixes)}
    if odd := sorted(mine.keys() ^ theirs.keys()):
        raise WeightsError(f"{what}: {odd[0]} is {'missing' if odd[0] in mine else 'unexpected'}; the VAE the U-Net "
                           "was trained with has the same encoder keys (only the decoder may be fine-tuned)")
    for key, value in mine.items():
        if theirs[key].shape != value.shape:
            raise WeightsError(f"{what}: {key} has shape {tuple(theirs[key].shape)}, the training VAE's "
                               f"{tuple(value.shape)}")
        if not torch.equal(theirs[key].to(value.device, value.dtype), value):
            raise WeightsError(f"{what}: {key} differs from the VAE the U-Net was trained with, so its latents are "
                               "not the U-Net's (only the decoder may be fine-tuned)")


def export(checkpoint_dir: str | Path, out_dir: str | Path, use_ema: bool = True,
           vae: AutoencoderKL | None = None, vae_name: str = "the replacement VAE", overwrite: bool = False) -> Path:
    """Write the pipeline of `checkpoint_dir` (a checkpoint, or a run folder: its latest) to `out_dir`, with the EMA
    U-Net weights (use_ema=True) or the raw ones. `vae` replaces the training VAE (e.g. its decoder fine-tuned,
    ldm.training.vae's train_encoder=false); it must encode exactly as the training VAE (check_same_latents, whose
    errors call it `vae_name`). `out_dir` may replace a pipeline folder, anything else only with overwrite=True, and
    never the run itself or a folder holding it. Returns out_dir."""
    ckpt = find_checkpoint(checkpoint_dir)
    run, out = ckpt.resolve().parent.parent, Path(out_dir).resolve()
    if out == run or out in run.parents or run in out.parents:  # the run, a folder holding it, or one inside it
        raise FileExistsError(f"export to {out_dir} would write over or into the training run {run}: choose a folder "
                              "outside it")
    meta = read_meta(ckpt)
    if meta["config"].get("lora") is not None:
        raise WeightsError(f"{ckpt} holds a LoRA, not a U-Net: export it with export_lora (ldm export --lora CKPT "
                           f"OUT.safetensors); {ckpt.parent.parent / 'frozen'} is the base pipeline it applies to")
    frozen = (ckpt / meta["frozen"]).resolve()
    if not frozen.is_dir():
        raise FileNotFoundError(f"{ckpt}: the frozen components folder {frozen} named in meta.json is missing "
                                "(copy the whole run folder, not just the checkpoint)")
    recorded = meta.get("frozen_sha256")
    if recorded is None:
        warnings.warn(f"{ckpt}: meta.json records no frozen_sha256 (a checkpoint from before it was recorded), so it "
                      f"is not checked that {frozen} holds the VAE / text encoder this U-Net was trained with",
                      stacklevel=2)
    elif folder_digest(frozen) != recorded:
        raise WeightsError(f"{frozen} is not the frozen VAE / text encoder / schedule the U-Net of {ckpt} was trained "
                           "with (its sha256 differs from meta.json's frozen_sha256): was another run started in the "
                           "same output_dir, or the folder edited?")
    if meta["config"].get("super_resolution") is not None:  # an upscaler folder (ldm.training.super_resolution)
        if vae is not None:
            raise ValueError(f"{ckpt}: a super-resolution stage is exported with the VAE it was trained with")
        return export_upscaler(ckpt, frozen, out_dir, load_weights_only(ckpt, "unet", use_ema=use_ema),
                               overwrite=overwrite)
    with warnings.catch_warnings():  # an older run's frozen/ says steps_offset 0: the export records 1, nothing to do
        warnings.filterwarnings("ignore", message=".*steps_offset is")
        parts = load_pipeline_folder(frozen, unet_weights=False)
    if vae is not None:
        check_same_latents(parts.vae, vae, f"export: {vae_name}")
    load_weights(parts.unet, load_weights_only(ckpt, "unet", use_ema=use_ema), what=f"{ckpt} unet")
    if "text_encoder" in meta["parts"]:  # trained jointly (train_text_encoder): frozen/ holds the initial one
        load_weights(parts.text_encoder, load_weights_only(ckpt, "text_encoder", use_ema=use_ema),
                     what=f"{ckpt} text_encoder")
    save_pipeline(out_dir, unet=parts.unet, vae=vae if vae is not None else parts.vae,
                  text_encoder=parts.text_encoder, schedule=parts.schedule, scheduler_config=parts.scheduler_config,
                  overwrite=overwrite)
    return Path(out_dir)


def export_lora(checkpoint_dir: str | Path, out_file: str | Path, *, format: str = "diffusers", use_ema: bool = True,
                overwrite: bool = False) -> Path:
    """Write the LoRA of a LoRA run's checkpoint (`checkpoint_dir`: a checkpoint, RUN/checkpoints/latest or a run
    folder) as one safetensors file through ldm.lora.weights.save_lora_file, in the diffusers/peft layout (which
    diffusers' load_lora_weights reads) or the kohya/A1111 one; the EMA weights (use_ema=True) or the raw ones."""
    from ldm.lora.weights import LoraModule, canonical, save_lora_file

    ckpt = find_checkpoint(checkpoint_dir)
    meta = read_meta(ckpt)
    lora = meta["config"].get("lora")
    if lora is None:
        raise WeightsError(f"{ckpt} is from a full fine-tune (its config has no lora section): export it as a pipeline "
                           "folder (ldm export without --lora)")
    out = Path(out_file)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: a LoRA is written as a .safetensors file")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
    alpha = float(lora["alpha"] if lora["alpha"] is not None else lora["rank"])
    weights = {}
    for part in ("unet", "text_encoder"):
        if part not in meta["parts"]:
            continue
        state = load_weights_only(ckpt, part, use_ema=use_ema)
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                path = key.removesuffix(".lora_A.weight")
                weights[canonical(part, path)] = LoraModule(down, state[f"{path}.lora_B.weight"], alpha)
    save_lora_file(out, weights, format=format,
                   metadata={"ldm_checkpoint": ckpt.name, "ldm_ema": str(use_ema and bool(meta.get("ema")))})
    return out
