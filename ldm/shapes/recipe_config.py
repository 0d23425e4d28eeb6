"""The default model's recipe as data: the stage configs (mirrored by ldm/configs/default-model.yaml), the run folders each
stage writes under --out, and `load_recipe`, which places them and spreads the one seed (ldm.shapes.recipe runs it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autoencoder.model import VAEConfig
from ldm.training.vae import VAETrainConfig
from ldm.config import BUNDLED_CONFIGS, apply_overrides, from_dict, load_yaml
from ldm.networks.unet import UNetConfig
from ldm.training.clip import ClipTrainConfig
from ldm.training.config import TrainConfig
from ldm.training.launch import split_batch

DEFAULT_CONFIG = BUNDLED_CONFIGS / "default-model.yaml"
STAGES = ("data", "clip", "vae", "init", "unet", "layout", "decoder", "export")


@dataclass
class DataStageConfig:
    """Sizes of the exported splits (images are size x size) and the training split's layout mix: `train_layouts`
    reweights ldm.shapes.scenes.LAYOUTS' names for data/train only (null: LAYOUTS); the test splits keep LAYOUTS, so the
    benchmark's prompt sets do not move with the training mix."""

    n_train: int = 10000
    n_test_held_out: int = 500
    n_test_seen: int = 500
    size: int = 64
    train_layouts: dict[str, float] | None = None

    def __post_init__(self) -> None:
        from ldm.shapes.scenes import check_layouts

        if self.train_layouts is not None:
            check_layouts(self.train_layouts)


@dataclass
class LayoutTuneConfig:
    """The layout stage: `n_train` scenes drawn with `layouts` weights (ldm.shapes.scenes.LAYOUTS' names), two-object
    relations stated with probability `relation_stated`, then `unet` (ldm.training.unet; model.pretrained = the unet
    stage's EMA export, set by the recipe). `enabled: false` keeps the settings but skips the stage, as null does."""

    unet: TrainConfig
    enabled: bool = True
    n_train: int = 4000
    layouts: dict[str, float] = field(default_factory=lambda: {"relation": 1.0})
    relation_stated: float = 1.0

    def __post_init__(self) -> None:
        from ldm.shapes.scenes import check_layouts, check_relation_stated

        check_layouts(self.layouts)
        check_relation_stated(self.relation_stated)


@dataclass
class DefaultModelConfig:
    """The whole recipe (ldm/configs/default-model.yaml). Stage configs carry no paths: the recipe sets them."""

    clip: ClipTrainConfig
    vae_model: VAEConfig
    vae: VAETrainConfig
    unet_model: UNetConfig
    unet: TrainConfig
    seed: int = 0
    num_threads: int | None = 1  # torch CPU threads (None: torch's default); 1 is fastest on a shared 2-core CPU
    # The U-Net stages (unet, layout) in this many local processes (ldm.training.launch: accelerate, DDP), num_threads each;
    # their run.batch_size stays the global batch. 1: in this process.
    num_processes: int = 1
    data: DataStageConfig = field(default_factory=DataStageConfig)
    # After unet.run.max_steps, continue the same run to each of these step counts in turn, the LR schedule's
    # horizon moved to each (a warm restart: cosine resumes at lr(step) of the longer schedule)
    unet_extend_to: list[int] = field(default_factory=list)
    # A last U-Net phase on a layout-weighted mix (null or enabled: false: ship the unet stage's EMA weights)
    unet_layout: LayoutTuneConfig | None = None
    # Decoder-only fine-tuning of the VAE after the U-Net (SD's ft-EMA / ft-MSE practice); null: ship the vae stage's
    vae_decoder: VAETrainConfig | None = None
    # How the init stage scales the VAE's latents for the U-Net: "scalar", z / std over all channels (LDM's
    # scaling_factor); "per_channel", each channel to zero mean and unit std, folded into the VAE's 1 x 1 convs
    # (autoencoder.latent_norm; the folder stays a plain diffusers AutoencoderKL with scaling_factor 1)
    latent_norm: Literal["scalar", "per_channel"] = "scalar"
    # Run the decoder stage (it needs only init/ and data/) in a second 1-thread process beside the U-Net stages,
    # this process meanwhile on num_threads - 1 threads (ldm.training.beside); false: after them, in this process
    decoder_beside_unet: bool = False
    # The init stage's noise schedule: SD's scaled-linear one with SNR(t) divided by snr_shift^2 (ldm.diffusion.schedule.
    # shift_snr; 2 gives 16 x 16 latents the coarse-scale SNR that 8 x 8 latents have under SD's schedule; it did
    # not speed up layout learning there: docs/default-model-research.md, "The time budget")
    snr_shift: float = 1.0

    def __post_init__(self) -> None:
        if not self.snr_shift > 0:
            raise ValueError(f"snr_shift must be > 0, got {self.snr_shift}")
        if self.vae_decoder is not None and self.vae_decoder.train_encoder:
            raise ValueError("vae_decoder.train_encoder must be false: the U-Net was trained on the encoder's latents")
        for run in (self.unet, self.unet_layout and self.unet_layout.unet):
            if run:
                split_batch(run, self.num_processes)  # fails now, naming the batch, not hours later
        horizons = self.unet_horizons()
        if any(b <= a for a, b in zip(horizons, horizons[1:])):
            raise ValueError(f"unet_extend_to must rise above unet.run.max_steps ({self.unet.run.max_steps}), "
                             f"got {self.unet_extend_to}")

    def unet_horizons(self) -> list[int]:
        """The U-Net stage's LR horizons in order: unet.run.max_steps, then each of unet_extend_to."""
        return [self.unet.run.max_steps, *self.unet_extend_to]

    def runs(self, stage: str) -> bool:
        """Whether an optional stage ("layout", "decoder") runs: its section is set (and the layout's enabled)."""
        section = getattr(self, OPTIONAL_STAGES[stage])
        return section is not None and getattr(section, "enabled", True)


# Where each stage's paths point, relative to --out (dotted keys into the config dict).
_PATHS: dict[str, str] = {
    "clip.data.path": "data/train", "clip.run.output_dir": "clip",
    "vae.data.path": "data/train", "vae.eval_data.path": "data/test-held-out", "vae.run.output_dir": "vae",
    "vae.model.config": "vae-model.yaml",
    "unet.data.path": "data/train", "unet.run.output_dir": "unet", "unet.model.pretrained": "init",
    "unet.objective.align.encoder": "clip-export",  # REPA's targets (used when unet.objective.align.weight > 0)
}
_DECODER_PATHS: dict[str, str] = {
    "vae_decoder.data.path": "data/train", "vae_decoder.eval_data.path": "data/test-held-out",
    "vae_decoder.run.output_dir": "vae-decoder", "vae_decoder.model.pretrained": "init/vae",
}
_LAYOUT_PATHS: dict[str, str] = {
    "unet_layout.unet.data.path": "data/train-layout", "unet_layout.unet.run.output_dir": "unet-layout",
    "unet_layout.unet.model.pretrained": "unet-export",
}
# The optional stages and their config sections: null -> the stage is skipped (its .done marker says "skipped").
OPTIONAL_STAGES: dict[str, str] = {"layout": "unet_layout", "decoder": "vae_decoder"}
# Each optional section's training run (its config path) and where its paths point.
_OPTIONAL_RUNS: dict[str, tuple[str, dict[str, str]]] = {"unet_layout": ("unet_layout.unet", _LAYOUT_PATHS),
                                                         "vae_decoder": ("vae_decoder", _DECODER_PATHS)}
_SEEDS = ("clip.init_seed", "clip.run.seed", "clip.data.seed", "vae.model.init_seed", "vae.run.seed", "vae.data.seed",
          "unet.run.seed", "unet.data.seed")


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *head, last = dotted.split(".")
    for key in head:
        d = d.setdefault(key, {})
    d[last] = value


def load_recipe(path: str | Path, out: str | Path, overrides: list[str] | None = None) -> DefaultModelConfig:
    """The recipe config from YAML with `key.sub=value` overrides, its paths placed under `out`, seeds from `seed`."""
    data = apply_overrides(load_yaml(path), list(overrides or []))
    out = Path(out)
    enabled = [_OPTIONAL_RUNS[s] for s in _OPTIONAL_RUNS if data.get(s) is not None]
    paths = dict(_PATHS)
    for _, extra in enabled:
        paths.update(extra)
    for key, rel in paths.items():
        _set(data, key, str(out / rel))
    seed = int(data.get("seed", 0))
    for key in (*_SEEDS, *(f"{run}.{k}.seed" for run, _ in enabled for k in ("run", "data"))):
        _set(data, key, seed)
    for run in ("clip", "vae", "unet", *(run for run, _ in enabled)):
        _set(data, f"{run}.run.resume", "latest")  # None when there is no checkpoint yet: a fresh run
    return from_dict(DefaultModelConfig, data, where=str(path))
