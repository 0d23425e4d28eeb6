"""LoRA weights as data, and the two file layouts they are shared in.

A LoRA module is one low-rank update of a layer's weight (Hu et al. 2021, "LoRA", eq. 3):
W' = W + scale * (alpha / r) * up @ down, with down (r, in) and up (out, r) for a Linear layer, down (r, in, kh, kw)
and up (out, r, 1, 1) for a convolution (LoCon). `LoraWeights` maps "unet.<module path>" and
"text_encoder.<module path>" (our module names: diffusers' U-Net names, transformers' flattened CLIPTextModel names
without "text_model.") to LoraModule.

Layouts (`read_lora_file` tells them apart by their keys; every key must be understood, or it is an error naming it):
- diffusers / peft: "unet.<module>.lora_A.weight" (down), ".lora_B.weight" (up); the text encoder's keys as
  "text_encoder.text_model.<module>" (what diffusers writes with transformers 4, and reads with 4 and 5); alphas in
  the safetensors metadata "lora_adapter_metadata" as diffusers' save_lora_weights writes them (peft's LoraConfig
  fields per component: "unet.lora_alpha", "unet.alpha_pattern", ...), or per module "<prefix>.<module>.alpha";
  neither: alpha = r (scale 1), as diffusers.
- kohya / A1111 (ldm.lora.kohya): "lora_unet_<module with _>.lora_down.weight", ".lora_up.weight", ".alpha",
  "lora_te_<...>" for the text encoder.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn

import torch
from torch import nn

from ldm.io import WeightsError, load_state_dict, save_state_dict
from ldm.lora.base import (
    TEXT_MODEL,
    LoraModule,
    LoraWeights,
    canonical,
    check_module,
    split_key,
)
from ldm.lora.kohya import from_kohya, is_kohya_layout, to_kohya

if TYPE_CHECKING:
    from ldm.networks.unet_config import UNetConfig

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def lora_weights_of(model: nn.Module, prefix: str, adapter: str = "default") -> LoraWeights:
    """The LoRA modules of peft adapter `adapter` in `model` (the U-Net, or a text encoder's CLIP text model), keyed
    "<prefix>.<module path>" (detached, not copied). A model without that adapter is an error."""
    from peft.tuners.lora import LoraLayer

    out: LoraWeights = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            out[canonical(prefix, name)] = LoraModule(module.lora_A[adapter].weight.detach(),
                                                      module.lora_B[adapter].weight.detach(),
                                                      float(module.lora_alpha[adapter]))
    if not out:
        raise ValueError(f"{type(model).__name__} holds no LoRA layers of adapter {adapter!r}")
    return out


# ------------------------------------------------------------------------------------------- diffusers / peft layout
def is_diffusers_layout(keys: list[str]) -> bool:
    return any(".lora_A." in k or ".lora_B." in k or _OLD_LAYOUT.fullmatch(k) for k in keys)


# diffusers' layout before peft (its attention processors and LoRACompatible layers, 2023 files):
# <module>.processor.to_q_lora.down.weight, ...to_out_lora..., <module>.lora_linear_layer.down.weight,
# <module>.lora.down.weight
_OLD_LAYOUT = re.compile(r"(.+?)(?:\.processor)?\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora|lora_linear_layer|lora)"
                         r"\.(down|up)\.weight")
_OLD_ATTENTION = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_OLD_TEXT_ATTENTION = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


def _peft_key(key: str) -> str:
    """A key of diffusers' pre-peft layout as peft's (<module>.lora_A.weight / lora_B.weight); others unchanged."""
    m = _OLD_LAYOUT.fullmatch(key)
    if m is None:
        return key
    module, kind, which = m.groups()
    if kind in _OLD_ATTENTION:
        names = _OLD_TEXT_ATTENTION if key.startswith("text_encoder") else _OLD_ATTENTION
        module = f"{module}.{names[kind]}"
    return f"{module}.lora_{'A' if which == 'down' else 'B'}.weight"


def to_diffusers(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of the diffusers/peft layout: diffusers' save_lora_weights keys, the ranks
    and alphas as its `lora_adapter_metadata` (peft LoraConfig fields per component: the most common rank and alpha,
    the others in rank_pattern / alpha_pattern, target_modules), which diffusers' load_lora_weights reads."""
    state: dict[str, torch.Tensor] = {}
    by_prefix: dict[str, dict[str, LoraModule]] = {}
    for key, m in weights.items():
        check_module(key, m)
        prefix, module = split_key(key)
        by_prefix.setdefault(prefix, {})[module] = m
        path = f"{TEXT_MODEL}{module}" if prefix.startswith("text_encoder") else module
        state[f"{prefix}.{path}.lora_A.weight"] = m.down
        state[f"{prefix}.{path}.lora_B.weight"] = m.up
    config: dict[str, object] = {}
    for prefix, modules in by_prefix.items():
        r = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
        config.update({
            f"{prefix}.r": r, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": sorted(modules),
            f"{prefix}.rank_pattern": {k: m.rank for k, m in modules.items() if m.rank != r},
            f"{prefix}.alpha_pattern": {k: m.alpha for k, m in modules.items() if m.alpha != alpha},
        })  # fmt: skip
    return state, {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """peft's get_pattern_key: the first pattern P with `module` matching (.*\\.)?(P)$, else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _adapter_config(metadata: Mapping[str, str] | None, path: object) -> dict[str, object]:
    """The per-component LoraConfig fields diffusers keeps in the file's metadata ({} when absent)."""
    text = (metadata or {}).get(METADATA_KEY)
    if text is None:
        return {}
    try:
        config = json.loads(text)
    except ValueError as e:
        raise WeightsError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: the {METADATA_KEY!r} metadata must be a JSON object")
    return config


def from_diffusers(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                   path: object = "LoRA") -> LoraWeights:
    """LoraWeights of a diffusers/peft-layout state dict (see the module docstring); every key is checked."""
    config = _adapter_config(metadata, path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in state.items():
        if key.endswith(".alpha"):
            prefix, module = split_key(key.removesuffix(".alpha"))
            if value.numel() != 1:
                _bad(path, key, f"an alpha must hold one number, got shape {tuple(value.shape)}")
            alphas[canonical(prefix, module)] = float(value.float().reshape(-1)[0])
            continue
        m = re.fullmatch(r"(.+)\.lora_(A|B)\.weight", _peft_key(key))
        if m is None:
            hint = " (DoRA is not supported)" if "magnitude" in key or "dora" in key else ""
            _bad(path, key, f"not a LoRA weight of the diffusers/peft layout (<component>.<module>.lora_A.weight or "
                            f"lora_B.weight){hint}")
        prefix, module = split_key(m.group(1))
        parts.setdefault(canonical(prefix, module), {})[m.group(2)] = value
    weights: LoraWeights = {}
    for key, pair in parts.items():
        if set(pair) != {"A", "B"}:
            has, missing = ("A", "B") if "A" in pair else ("B", "A")
            _bad(path, key, f"has lora_{has}.weight but no lora_{missing}.weight")
        prefix, module = split_key(key)
        rank = int(pair["A"].shape[0])
        fields = {f: config.get(f"{prefix}.{f}") for f in ("r", "lora_alpha", "rank_pattern", "alpha_pattern")}
        if fields["r"] is not None:  # diffusers would build this rank: the tensors must agree
            want = _pattern_value(fields["rank_pattern"] or {}, module, fields["r"])
            if want != rank:
                _bad(path, key, f"the metadata gives rank {want}, the tensors rank {rank}")
        if config.get(f"{prefix}.use_dora"):
            _bad(path, key, "the metadata says DoRA (use_dora), which is not supported")
        alpha = alphas.pop(key, None)
        if alpha is None:
            base = fields["lora_alpha"] if fields["lora_alpha"] is not None else rank
            alpha = float(_pattern_value(fields["alpha_pattern"] or {}, module, base))  # type: ignore[arg-type]
            if config.get(f"{prefix}.use_rslora"):  # rsLoRA scales by alpha / sqrt(r) = (alpha sqrt(r)) / r
                alpha *= math.sqrt(rank)
        weights[key] = LoraModule(pair["A"], pair["B"], alpha)
        check_module(key, weights[key])
    if alphas:
        _bad(path, next(iter(alphas)) + ".alpha", "an alpha of a module that has no lora_A / lora_B weights")
    return weights


def _bad(path: object, key: str, problem: str) -> NoReturn:
    raise WeightsError(f"{path}: LoRA key {key!r}: {problem}")


# ------------------------------------------------------------------------------------------------------ files
def save_lora_file(path: str | Path, weights: LoraWeights, *, format: Literal["diffusers", "kohya"],
                   metadata: dict[str, str] | None = None) -> None:
    """Write `weights` as one safetensors file (atomically, ldm.io.save_state_dict) in the diffusers/peft layout,
    which diffusers' load_lora_weights reads, or the kohya/A1111 layout; `metadata`: extra string pairs to keep."""
    if not weights:
        raise ValueError("no LoRA modules to save")
    if format == "diffusers":
        state, meta = to_diffusers(weights)
    elif format == "kohya":
        state, meta = to_kohya(weights), {}
    else:
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    save_state_dict(state, path, metadata={"format": "pt", **(metadata or {}), **meta})


def read_lora_file(path: str | Path, *, allow_pickle: bool = False,
                   unet_config: UNetConfig | None = None) -> LoraWeights:
    """The LoRA in `path` (safetensors; a pickle file only with allow_pickle=True; a folder: the
    pytorch_lora_weights file diffusers' save_lora_weights writes in it), in either layout, detected from its keys.
    A kohya file naming U-Net modules by the original CompVis paths (input_blocks...) needs `unet_config` to map them
    to ours. A file that is not a LoRA, or holds a key neither layout explains, is a WeightsError."""
    path = _lora_file(Path(path))
    state = load_state_dict(path, allow_pickle=allow_pickle)
    keys = list(state)
    if not keys:
        raise WeightsError(f"{path} holds no tensors: not a LoRA file")
    if is_kohya_layout(keys):
        return from_kohya(state, path=path, unet_config=unet_config)
    if is_diffusers_layout(keys):
        return from_diffusers(state, file_metadata(path), path=path)
    raise WeightsError(f"{path} is not a LoRA file: no key is a LoRA weight of the diffusers/peft layout "
                       f"(<component>.<module>.lora_A.weight) or the kohya layout (lora_unet_<module>.lora_down.weight)"
                       f"; first keys: {keys[:4]}")


DIFFUSERS_LORA_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # save_lora_weights' names


def _lora_file(path: Path) -> Path:
    """`path`, or in a folder the file diffusers' save_lora_weights writes there."""
    if not path.is_dir():
        return path
    found = [path / n for n in DIFFUSERS_LORA_NAMES if (path / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{path} is a folder without a LoRA file of diffusers' names {DIFFUSERS_LORA_NAMES}")
    return found[0]


def file_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for a pickle file)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
