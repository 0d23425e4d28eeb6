"""The kohya / A1111 LoRA layout: "lora_unet_<module path, dots as underscores>.lora_down.weight", ".lora_up.weight"
and ".alpha" (a scalar), "lora_te_<...>" for the text encoder ("lora_te1_" / "lora_te2_" for SDXL's two).

kohya's sd-scripts (and the LoCon / LyCORIS networks that follow it) name SD 1.x / 2.x modules by diffusers' U-Net
and transformers' CLIPTextModel paths ("lora_unet_down_blocks_0_attentions_0_proj_in",
"lora_te_text_model_encoder_layers_0_self_attn_q_proj"): that is what `to_kohya` writes and what diffusers'
_convert_non_diffusers_lora_to_diffusers and A1111 read. Files naming U-Net modules by the original CompVis paths
("lora_unet_input_blocks_1_1_proj_in", as SDXL's sgm U-Net and some converters write) are read through
ldm.loading.convert's prefix map, given the U-Net's config; text-encoder modules named by the OpenCLIP tower of SD 2.x
("lora_te_model_transformer_resblocks_N_mlp_c_fc", A1111's names) map to the CLIP layers they were converted to.

An underscore path is read back by joining the underscores that belong to a module name (`_NAMES`, longest first);
a name this cannot place reaches no module and is an error naming the file's key when the LoRA is applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ldm.io import WeightsError
from ldm.lora.base import (
    TEXT_MODEL,
    LoraModule,
    LoraWeights,
    canonical,
    check_module,
    split_key,
)
from ldm.networks.text_openclip import OPENCLIP_BLOCK_MODULES

if TYPE_CHECKING:
    from ldm.networks.unet_config import UNetConfig

# module and attribute names holding an underscore: ours (diffusers'), CompVis', transformers' CLIP, OpenCLIP's
_NAMES = (
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "class_embedding", "add_time_proj",
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "text_projection",
    "token_embedding", "position_embedding", "layer_norm1", "layer_norm2",
    "c_fc", "c_proj", "in_proj", "ln_final", "ln_1", "ln_2",
)  # fmt: skip
_BY_LENGTH = sorted((n.split("_") for n in _NAMES), key=len, reverse=True)
_COMPVIS_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "out", "label_emb")
_OPENCLIP_BLOCK = re.compile(r"model\.transformer\.resblocks\.(\d+)\.(.+)")  # SD 2.x text encoder, A1111 names
_UNSUPPORTED = {"hada_": "LoHa", "lokr_": "LoKr", "dora_scale": "DoRA", "lora_mid": "LoCon's CP (Tucker) decomposition",
                "diff": "a full weight difference", "glora": "GLoRA", "oft_": "OFT"}


def is_kohya_layout(keys: list[str]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def _component_prefixes(weights: LoraWeights) -> dict[str, str]:
    two = any(k.startswith("text_encoder_2.") for k in weights)
    return {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two else "lora_te_", "text_encoder_2": "lora_te2_"}


def kohya_name(key: str, prefixes: Mapping[str, str] | None = None) -> str:
    """"unet.down_blocks.0.attentions.0.proj_in" -> "lora_unet_down_blocks_0_attentions_0_proj_in"; a text encoder's
    path as transformers' CLIPTextModel before version 5 ("lora_te_text_model_encoder_layers_0_self_attn_q_proj")."""
    prefix, module = split_key(key)
    if prefix.startswith("text_encoder") and not module.startswith("text_projection"):
        module = TEXT_MODEL + module
    return (prefixes or _component_prefixes({key: None}))[prefix] + module.replace(".", "_")  # type: ignore[dict-item]


def to_kohya(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """The kohya-layout state dict of `weights`: lora_down / lora_up weights and a scalar float32 alpha per module."""
    prefixes = _component_prefixes(weights)
    state: dict[str, torch.Tensor] = {}
    for key, m in weights.items():
        check_module(key, m)
        name = kohya_name(key, prefixes)
        state[f"{name}.lora_down.weight"] = m.down
        state[f"{name}.lora_up.weight"] = m.up
        state[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return state


def dotted(name: str) -> str:
    """An underscore path with the dots put back: underscores inside a known module name (`_NAMES`) stay."""
    parts, out, i = name.split("_"), [], 0
    while i < len(parts):
        word = next((w for w in _BY_LENGTH if parts[i:i + len(w)] == w), [parts[i]])
        out.append("_".join(word))
        i += len(word)
    return ".".join(out)


def from_kohya(state: Mapping[str, torch.Tensor], *, path: object = "LoRA",
               unet_config: UNetConfig | None = None) -> LoraWeights:
    """LoraWeights of a kohya-layout state dict; every key must be a lora_down / lora_up weight or an alpha of a
    module with both (alpha absent: the rank, kohya's default), else a WeightsError naming it."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, kind = key.partition(".")
        if not name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
            raise WeightsError(f"{path}: LoRA key {key!r} names no component (lora_unet_ / lora_te_ / lora_te1_ / "
                               "lora_te2_)")
        if kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            what = next((v for k, v in _UNSUPPORTED.items() if k in kind), None)
            raise WeightsError(f"{path}: LoRA key {key!r}: "
                               + (f"{what} is not supported" if what else "not a lora_down / lora_up weight or alpha"))
        groups.setdefault(name, {})[kind] = value
    compvis: dict[str, str] = {}
    weights: LoraWeights = {}
    for name, g in groups.items():
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            missing = "lora_down.weight" if "lora_down.weight" not in g else "lora_up.weight"
            raise WeightsError(f"{path}: LoRA module {name!r} has no {missing}")
        alpha = g.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise WeightsError(f"{path}: LoRA key '{name}.alpha' must hold one number, got shape {tuple(alpha.shape)}")
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        a = float(alpha.float().reshape(-1)[0]) if alpha is not None else float(down.shape[0])
        for key, m in _modules(name, down, up, a):
            if key in weights:
                raise WeightsError(f"{path}: LoRA modules {weights[key].source!r} and {name!r} both name {key}")
            check_module(f"{name} ({key})", m)
            weights[key] = m
            if key.startswith("unet.") and key.split(".")[1] in _COMPVIS_ROOTS:
                compvis[key] = name
    if compvis:
        weights = _compvis_to_ours(weights, compvis, unet_config, path)
    return weights


def _modules(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> list[tuple[str, LoraModule]]:
    """The LoraWeights entries of kohya module `name`: one, or three for an OpenCLIP attention in_proj (q, k, v share
    down; up splits by rows, as in_proj_weight = [W_q; W_k; W_v])."""
    for kohya, prefix in (("lora_unet_", "unet"), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                          ("lora_te_", "text_encoder")):
        if name.startswith(kohya):
            module = dotted(name[len(kohya):])
            break
    m = _OPENCLIP_BLOCK.fullmatch(module) if prefix.startswith("text_encoder") else None
    if m and (ours := OPENCLIP_BLOCK_MODULES.get(m.group(2))):
        layer = f"{prefix}.encoder.layers.{m.group(1)}."
        if len(ours) == 3:
            if up.shape[0] % 3:
                raise WeightsError(f"LoRA {name}: an in_proj up {tuple(up.shape)} does not split in three")
            return [(layer + p, LoraModule(down, u, alpha, name)) for p, u in zip(ours, up.chunk(3, dim=0))]
        module = f"encoder.layers.{m.group(1)}.{ours[0]}"
    return [(canonical(prefix, module), LoraModule(down, up, alpha, name))]


def _compvis_to_ours(weights: LoraWeights, compvis: dict[str, str], unet_config: UNetConfig | None,
                     path: object) -> LoraWeights:
    """U-Net keys in CompVis paths (input_blocks.1.1...) renamed to ours by ldm.loading.convert's prefix map."""
    from ldm.loading.convert import rename, unet_prefix_map

    if unet_config is None:
        first = next(iter(compvis.values()))
        raise WeightsError(f"{path}: LoRA module {first!r} names the U-Net by its CompVis path: reading it needs the "
                           "U-Net's config (read_lora_file(..., unet_config=...); Pipeline.load_lora passes it)")
    pairs = unet_prefix_map(unet_config.block_out_channels, unet_config.layers_per_block,
                            unet_config.down_block_types, unet_config.up_block_types)
    sources = {k.removeprefix("unet."): k for k in compvis}
    renamed = rename({k: torch.empty(0) for k in sources}, pairs, "to_ours")  # module paths as keys
    out = {k: m for k, m in weights.items() if k not in compvis}
    for theirs, ours in zip(sources, renamed):
        key = "unet." + ours
        if key in out:
            raise WeightsError(f"{path}: LoRA modules {out[key].source!r} and {compvis[sources[theirs]]!r} both "
                               f"name {key}")
        out[key] = weights[sources[theirs]]
    return out
