"""LoRAs in a Pipeline: `pipe.load_lora(path, scale, name)` (diffusers/peft or kohya/A1111 file), several named
adapters active at once with per-adapter scales, unloading, and fusing into the weights (ldm.lora: the files and
peft's layers).

    pipe.load_lora("style.safetensors", scale=0.8)           # named "style"
    pipe.load_lora("shape.safetensors", name="shape")
    pipe.set_lora_scale("style", 0.5)
    pipe.fuse_lora()      # the updates added into the weights: sampling runs at the base model's speed
    pipe.unfuse_lora()    # taken out again (the weights are restored within float rounding)
    pipe.unload_lora("shape")
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ldm.io import WeightsError
from ldm.lora import layers as peft_layers
from ldm.lora.weights import LoraModule, read_lora_file, split_key
from ldm.networks.text import is_clip_text_model


class LoraMixin:
    """LoRA loading for the Pipeline (it holds `unet` and `text_encoder`)."""

    unet: nn.Module
    text_encoder: nn.Module

    # ---------------------------------------------------------------------------------------------------- state
    @property
    def _lora_scales(self) -> dict[str, float]:
        return self.__dict__.setdefault("_lora_scale_table", {})  # adapter name -> scale, in loading order

    @property
    def lora_names(self) -> list[str]:
        """The names of the loaded LoRAs, in loading order."""
        return list(self._lora_scales)

    @property
    def lora_scales(self) -> dict[str, float]:
        """{name: scale} of the loaded LoRAs."""
        return dict(self._lora_scales)

    @property
    def lora_fused(self) -> bool:
        """Whether the loaded LoRAs are added into the weights (`fuse_lora`)."""
        return bool(self.__dict__.get("_lora_is_fused", False))

    def _lora_models(self) -> dict[str, nn.Module]:
        """The modules a LoRA file's components go into: the U-Net and each text encoder's CLIP text model."""
        models: dict[str, nn.Module] = {"unet": self.unet}
        for prefix in ("text_encoder", "text_encoder_2"):
            encoder = getattr(self, prefix, None)
            if encoder is not None:
                models[prefix] = getattr(encoder, "model", encoder)
        return models

    # ----------------------------------------------------------------------------------------------- public API
    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None, *,
                  allow_pickle: bool = False) -> str:
        """Load a LoRA file (diffusers/peft or kohya/A1111 layout, U-Net and text encoder) as adapter `name` (default:
        the file's stem) at `scale`, active with the LoRAs already loaded; returns its name. Every key is checked
        before anything changes: a module the model does not have, or a shape that does not fit, is a WeightsError
        naming the key (and both shapes). Pickle files only with allow_pickle=True."""
        name = _adapter_name(Path(path).stem if name is None else name)
        if name in self._lora_scales:
            raise ValueError(f"a LoRA named {name!r} is already loaded (loaded: {self.lora_names}); pass another "
                             "name=, or unload_lora it first")
        scale = _check_scale(scale)
        weights = read_lora_file(path, allow_pickle=allow_pickle, unet_config=getattr(self.unet, "config", None))
        models = self._lora_models()
        parts: dict[str, dict[str, LoraModule]] = {}
        for key, m in weights.items():
            prefix, module = split_key(key)
            if prefix not in models:
                raise WeightsError(f"{path}: LoRA key {m.source or key!r} is for the {prefix}, which this pipeline "
                                   "does not have")
            parts.setdefault(prefix, {})[module] = m
        for prefix, modules in parts.items():  # everything checked before any layer changes
            if prefix.startswith("text_encoder") and not is_clip_text_model(models[prefix]):
                raise WeightsError(f"{path}: the LoRA adapts the {prefix}, a {type(models[prefix]).__name__}: LoRAs "
                                   "load into CLIP text models only")
            try:
                peft_layers.check_fits(models[prefix], modules, prefix=prefix)
            except WeightsError as e:
                raise WeightsError(f"{path}: {e}") from e
        with self._lora_change():
            try:
                for prefix, modules in parts.items():
                    peft_layers.inject(models[prefix], modules, name, prefix=prefix)
            except BaseException:
                for model in models.values():  # no half-loaded adapter stays behind
                    peft_layers.remove(model, name)
                raise
            self._lora_scales[name] = scale
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Set LoRA `name`'s scale (0: as if not loaded); a fused pipeline is fused again at the new scale."""
        self._check_loaded(name)
        scale = _check_scale(scale)
        with self._lora_change():
            self._lora_scales[name] = scale

    def unload_lora(self, name: str | None = None) -> None:
        """Remove LoRA `name` (None: all of them); layers left without a LoRA are the plain layers again."""
        names = self.lora_names if name is None else [self._check_loaded(name)]
        with self._lora_change():
            for n in names:
                for model in self._lora_models().values():
                    peft_layers.remove(model, n)
                del self._lora_scales[n]

    def fuse_lora(self) -> None:
        """Add every loaded LoRA, at its scale, into the weights (peft's merge): sampling then costs what the base
        model's does. Loading, rescaling or unloading while fused unfuses and fuses again."""
        if not self._lora_scales:
            raise ValueError("no LoRA is loaded: nothing to fuse")
        if not self.lora_fused:
            for model in self._lora_models().values():
                peft_layers.merge(model, self.lora_names)
            self.__dict__["_lora_is_fused"] = True
            self._lora_changed()

    def unfuse_lora(self) -> None:
        """Take the fused LoRAs out of the weights again (restored within float rounding); they stay loaded."""
        if self.lora_fused:
            for model in self._lora_models().values():
                peft_layers.unmerge(model)
            self.__dict__["_lora_is_fused"] = False
            self._lora_changed()

    def check_no_lora(self, action: str) -> None:
        """Refuse `action` (e.g. a save_pretrained that cannot write merged weights) while LoRAs are loaded: the
        models then hold peft's layers, whose state dicts have keys (base_layer, lora_A) no pipeline folder holds."""
        if self._lora_scales:
            raise ValueError(f"{action} with LoRAs loaded ({', '.join(self.lora_names)}) would write peft's layers: "
                             "unload_lora() first")

    @contextmanager
    def plain_layers(self, action: str) -> Iterator[None]:
        """The models with their plain layers (peft's wrappers taken out, put back after) for `action` (e.g.
        save_pretrained): with LoRAs fused, layers holding the merged weights; unfused LoRAs are refused (fuse_lora()
        to keep them in, or unload_lora())."""
        if self._lora_scales and not self.lora_fused:
            raise ValueError(f"{action} with LoRAs loaded and not fused ({', '.join(self.lora_names)}): fuse_lora() "
                             "to keep them in the weights, or unload_lora() first")
        swapped = [swap for model in self._lora_models().values() for swap in peft_layers.unwrap(model)]
        try:
            yield
        finally:
            for owner, child, layer in swapped:
                setattr(owner, child, layer)

    # ---------------------------------------------------------------------------------------------------- helpers
    def _check_loaded(self, name: str) -> str:
        if name not in self._lora_scales:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {self.lora_names})")
        return name

    @contextmanager
    def _lora_change(self) -> Iterator[None]:
        """Unfuse (when fused) around a change of the adapters, then activate them at their scales and fuse again."""
        fused = self.lora_fused
        self.unfuse_lora()
        try:
            yield
        finally:
            for model in self._lora_models().values():
                peft_layers.activate(model, self._lora_scales)
            if fused and self._lora_scales:
                self.fuse_lora()
            self._lora_changed()

    def _lora_changed(self) -> None:
        """The text encoder's cached embeddings (the empty prompt's) are stale once its weights change."""
        for prefix in ("text_encoder", "text_encoder_2"):
            clear = getattr(getattr(self, prefix, None), "clear_cache", None)
            if clear is not None:
                clear()


def _adapter_name(name: str) -> str:
    """A LoRA's name as peft keeps it (a module name: no dots); the file stem's dots become underscores."""
    name = str(name).replace(".", "_")
    if not name or not name.isprintable():
        raise ValueError(f"a LoRA name must be a non-empty printable string, got {name!r}")
    return name


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def parse_lora_option(spec: str) -> tuple[Path, float]:
    """`--lora PATH[:SCALE]` -> (path, scale); the scale defaults to 1. A ValueError names what is wrong."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            pass  # a ':' that is part of the path
        else:
            path = head
    if not math.isfinite(scale):
        raise ValueError(f"--lora {spec}: the scale must be a finite number")
    if not Path(path).expanduser().exists():
        raise ValueError(f"--lora {spec}: no file {path}")
    return Path(path).expanduser(), scale
