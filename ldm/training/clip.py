"""A small CLIP (Radford et al. 2021) trained contrastively on (image, caption) pairs: open_clip's CLIP built from a
config dict and its ClipLoss (the symmetric InfoNCE of Radford et al. 2021, fig. 3), on the shared resumable loop.

The image tower takes pixels in [-1, 1] as the data loader gives them (no extra normalisation). Captions are
tokenized by the project's offline CLIP tokenizer with pad token "!" (id 0), so ids equal open_clip's tokenizer's.
Its text tower, converted to a transformers CLIPTextModel (ldm.networks.text_openclip), is a pipeline's frozen text encoder;
its image tower gives CLIP scores and the feature space of a Frechet distance (benchmarks/quality.py).

    python -m ldm.training.clip --config default-model.yaml ...   (normally run by ldm.shapes.recipe)
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ldm.training.run_folder import hold_run_folder
from ldm.training.checkpoint import latest_checkpoint, load_weights_only
from ldm.training.loop import Part, StepContext, run_loop
from ldm.config import to_dict
from ldm.training.data import DataConfig, build_dataloader
from ldm.io import load_state_dict, save_state_dict, write_json
from ldm.networks.text import TextEncoder, load_hub_state_dict
from ldm.networks.tokenizer import MAX_LENGTH, build_clip_tokenizer
from ldm.networks.text_openclip import openclip_text_config, openclip_to_transformers, text_tower_state_dict
from ldm.networks.text_openclip import transformers_to_openclip
from ldm.training.config import OptimConfig, RunConfig, build_accelerator, build_lr_scheduler, build_optimizer

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
OPENCLIP_PAD = "!"  # open_clip's tokenizer pads with id 0, the token "!"


def default_clip_model() -> dict[str, Any]:
    """open_clip model config (its JSON layout): a 2-layer ViT on 64 px (8 px patches) and a 2-layer text tower."""
    return {"embed_dim": 64,
            "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


@dataclass
class ClipTrainConfig:
    """CLIP contrastive training; `model` is an open_clip model config dict (embed_dim, vision_cfg, text_cfg)."""

    data: DataConfig
    model: dict[str, Any] = field(default_factory=default_clip_model)
    init_seed: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98),
                                                                   eps=1e-6, lr_scheduler="cosine", warmup_steps=50))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/clip", batch_size=64, max_steps=500))
    hard_negatives: int = 0  # negative captions per image (NegCLIP); needs train_clip's negative_caption

    def __post_init__(self) -> None:
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in self.model:
                raise ValueError(f"clip model config lacks {key!r} (open_clip's layout: embed_dim, vision_cfg, text_cfg)")
        text = self.model["text_cfg"]
        if text.get("vocab_size", 49408) != 49408:
            raise ValueError(f"the text tower must have vocab_size 49408 (the CLIP tokenizer's), "
                             f"got {text['vocab_size']}")
        if not 3 <= context_length(self.model) <= MAX_LENGTH:
            raise ValueError(f"text_cfg.context_length must lie in [3, {MAX_LENGTH}] (bos, a token, eos; CLIP's "
                             f"position table), got {context_length(self.model)}")
        if self.run.cache_latents:
            raise ValueError("run.cache_latents has no meaning for CLIP training; set it to false")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {self.hard_negatives}")


def build_clip(model: dict[str, Any], seed: int = 0) -> nn.Module:
    """open_clip.CLIP(**model) with seeded weights, returning a dict from forward (output_dict=True)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(**copy.deepcopy(model), output_dict=True)


def context_length(model: dict[str, Any]) -> int:
    """Tokens per caption of the text tower (bos, caption, eos, padding): CLIP's 77, or fewer for short captions."""
    return int(model["text_cfg"].get("context_length", MAX_LENGTH))


def text_heads(model: dict[str, Any]) -> int:
    """Attention heads of the text tower (open_clip's default is 8)."""
    return int(model["text_cfg"].get("heads", 8))


def negclip_loss(image: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """(CE(s I [T; N]^T, diag) + CE(s T I^T, diag)) / 2 over normalised features: ClipLoss with extra negative texts N
    in the image-to-text direction (NegCLIP, Yuksekgonul et al. 2023, sec. 5); with no negatives it is ClipLoss."""
    labels = torch.arange(len(image), device=image.device)
    per_image = scale * image @ torch.cat([text, negatives]).T  # (B, B + M)
    per_text = scale * text @ image.T  # (B, B)
    return (nn.functional.cross_entropy(per_image, labels) + nn.functional.cross_entropy(per_text, labels)) / 2


NegativeCaption = Callable[[str, np.random.Generator], str]


class ContrastiveStep:
    """One micro-batch of the contrastive loss (negclip_loss), with `k` hard-negative captions per image."""

    def __init__(self, model: nn.Module, raw: nn.Module, device: torch.device, *, k: int = 0,
                 negative_caption: NegativeCaption | None = None, max_length: int = MAX_LENGTH) -> None:
        if k > 0 and negative_caption is None:
            raise ValueError("hard_negatives > 0 needs a negative_caption function (e.g. "
                             "ldm.shapes.negatives.hard_negative for the shapes data)")
        self.model, self.raw, self.device, self.k, self.negative_caption = model, raw, device, k, negative_caption
        self.tokenizer = build_clip_tokenizer(pad_token=OPENCLIP_PAD, model_max_length=max_length)

    def _ids(self, texts: list[str]) -> torch.Tensor:
        n = self.tokenizer.model_max_length
        return self.tokenizer(texts, padding="max_length", max_length=n, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)  # (N, context_length)

    def negatives(self, captions: list[str], ctx: StepContext) -> list[str]:
        """k negatives per caption, caption-major; slot i's come from its own seeded generator (resumable)."""
        if self.k == 0:
            return []
        rngs = [np.random.default_rng(int(torch.randint(2**62, (1,), generator=g))) for g in
                ctx.generators(len(captions))]
        return [self.negative_caption(c, rng) for c, rng in zip(captions, rngs) for _ in range(self.k)]  # type: ignore

    def __call__(self, batch: dict[str, Any], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        clamp_logit_scale(self.raw)  # before the forward, so that a resumed run repeats an uninterrupted one
        pixels = batch["pixel_values"].to(self.device)  # (B, 3, H, W) in [-1, 1]
        captions = list(batch["captions"])
        ids = self._ids(captions + self.negatives(captions, ctx))  # (B (1 + k), context_length)
        out = self.model(pixels, ids)
        scale = out["logit_scale"]  # open_clip returns exp(log scale)
        b = len(captions)
        text, neg = out["text_features"][:b], out["text_features"][b:]
        loss = negclip_loss(out["image_features"], text, neg, scale)
        with torch.no_grad():
            logits = out["image_features"] @ text.T  # (B, B)
            metrics = {"i2t_acc": float((logits.argmax(1) == torch.arange(b, device=self.device)).float().mean()),
                       "logit_scale": float(scale.detach())}
            if self.k:  # the true caption beats all of its own negatives
                own = (out["image_features"][:, None] * neg.view(b, self.k, -1)).sum(-1)  # (B, k)
                metrics["neg_acc"] = float((logits.diagonal()[:, None] > own).all(1).float().mean())
        return loss, metrics


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """Keep the temperature's scale exp(logit_scale) in [1, 100] (Radford et al. 2021, sec. 2.5)."""
    model.logit_scale.clamp_(0.0, math.log(max_scale))


def train_clip(config: ClipTrainConfig, negative_caption: NegativeCaption | None = None) -> dict[str, Any]:
    """Run (or resume, run.resume="latest") contrastive training; returns {"step", "checkpoint"}.

    negative_caption(caption, rng) writes a caption false of the image (config.hard_negatives per image)."""
    with hold_run_folder(config.run.output_dir):  # one run at a time; a killed run's temporaries go
        return _train_clip(config, negative_caption)


def _train_clip(config: ClipTrainConfig, negative_caption: NegativeCaption | None = None) -> dict[str, Any]:
    run = config.run
    accelerator = build_accelerator(run, config.optim)
    model = build_clip(config.model, config.init_seed).to(accelerator.device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    # open_clip's rule: no weight decay on gains, biases and the logit scale
    optimizer = build_optimizer([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], config.optim)
    scheduler = build_lr_scheduler(optimizer, config.optim, run.max_steps)
    loader, position = build_dataloader(config.data, run.batch_size, num_workers=run.num_workers,
                                        num_processes=accelerator.num_processes)
    model_p, optimizer_p, loader_p = accelerator.prepare(model, optimizer, loader)
    step_fn = ContrastiveStep(model_p, model, accelerator.device, k=config.hard_negatives,
                              negative_caption=negative_caption, max_length=context_length(config.model))
    result = run_loop(accelerator, run, config.optim, parts=[Part("clip", model_p, optimizer_p, scheduler)],
                      loader=loader_p, position=position, step_fn=step_fn,
                      meta={"config": to_dict(config)}, data=config.data)
    accelerator.end_training()
    return result


# ------------------------------------------------------------------------------------------------ export / load


def _text_tower_keys(state: dict[str, torch.Tensor]) -> set[str]:
    """The keys save_clip(text=False) leaves out: the text tower but its text_projection (kept with the CLIP)."""
    return set(text_tower_state_dict(state)) - {"text_projection"}


def save_clip(model: nn.Module, config: dict[str, Any], folder: str | Path, *, text: bool = True) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors; text=False leaves out the text tower (it ships
    as text_encoder/ beside it) and keeps the image tower, logit_scale and text_projection."""
    folder = Path(folder)
    state = model.state_dict()
    if not text:
        tower = _text_tower_keys(state)
        state = {k: v for k, v in state.items() if k not in tower}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items() if k != "attn_mask"}
    save_state_dict(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(config, folder / CONFIG_NAME)
    return folder


def export_clip(run_or_checkpoint: str | Path, folder: str | Path) -> Path:
    """The CLIP of a checkpoint (or a run folder's latest) as an open_clip folder (config + safetensors)."""
    path = Path(run_or_checkpoint)
    ckpt = path if (path / "meta.json").is_file() else latest_checkpoint(path / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
    model_config = json.loads((ckpt / "meta.json").read_text())["config"]["model"]
    model = build_clip(model_config)
    model.load_state_dict(load_weights_only(ckpt, "clip", use_ema=False))
    return save_clip(model, model_config, folder)


def load_clip(folder: str | Path, text_encoder_folder: str | Path | None = None) -> nn.Module:
    """An open_clip CLIP (eval mode) from a folder written by save_clip; the text tower comes from the folder when it
    has one, else from a diffusers pipeline folder's text_encoder/ (converted back; save_clip(text=False))."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a CLIP folder: {CONFIG_NAME} is missing")
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = build_clip(config)
    state = load_state_dict(folder / WEIGHTS_NAME)
    if text_encoder_folder is not None and not _text_tower_keys(state):
        enc = TextEncoder.from_pretrained(text_encoder_folder)
        state.update(transformers_to_openclip(dict(enc.model.state_dict()), enc.model.config))
    own = {k for k in model.state_dict() if k != "attn_mask"}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(f"{folder}: missing CLIP key(s) {missing[:5]}, unexpected {unexpected[:5]} (pass the "
                       "pipeline folder as text_encoder_folder when the text tower ships as text_encoder/)")
    model.load_state_dict(state, strict=False)
    return model.eval()


def clip_text_encoder(model: nn.Module, config: dict[str, Any]) -> TextEncoder:
    """The CLIP's text tower as a TextEncoder (transformers CLIPTextModel, tokenizer padding with "!" = id 0)."""
    from transformers import CLIPTextModel

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    text_config = openclip_text_config(state, num_heads=text_heads(config))
    text_model = CLIPTextModel(text_config)
    load_hub_state_dict(text_model, openclip_to_transformers(state, text_config))  # strict, hub-layout keys
    tokenizer = build_clip_tokenizer(pad_token=OPENCLIP_PAD, model_max_length=context_length(config))
    return TextEncoder(tokenizer, text_model.eval())


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ldm.training.config import load_train_config

    parser = argparse.ArgumentParser(prog="python -m ldm.training.clip", description="Train a small CLIP contrastively.")
    parser.add_argument("--config", required=True, help="YAML mirroring ldm.training.clip.ClipTrainConfig")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    result = train_clip(load_train_config(ClipTrainConfig, args.config, args.overrides))
    print(f"finished at step {result['step']}; last checkpoint {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
