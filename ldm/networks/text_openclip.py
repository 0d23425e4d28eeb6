"""OpenCLIP text tower <-> transformers CLIPTextModel weights: a key map plus shape checks, both directions.

open_clip's fused attention input projection `in_proj_weight` (3D, D) is [W_q; W_k; W_v] (torch.nn.MultiheadAttention),
so it splits into q_proj/k_proj/v_proj; `text_projection` (D, P) is used as x @ P, transformers' Linear stores P^T.
Keys on the transformers side are the on-disk layout of diffusers folders ("text_model.encoder.layers.N...").
SD 2.x drops the last of the 24 blocks ("penultimate layer"): `drop_last_layers=1` does the same.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # a config of either kind works below (the attributes match); transformers is imported on use
    from transformers import CLIPTextConfig

Tensor = torch.Tensor
_NON_TEXT = ("visual.", "logit_scale", "logit_bias", "attn_mask")


class ConversionError(ValueError):
    """A key is missing, unexpected or has the wrong shape; the message names the key and both shapes."""


def text_tower_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower entries of a whole open_clip state dict (CLIP: top level; CustomTextCLIP: under "text.")."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("text.") for k in state):
        return {k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}
    return {k: v for k, v in state.items() if not k.startswith(_NON_TEXT)}


def _num_blocks(state: dict[str, Tensor]) -> int:
    """Number of residual blocks present in an open_clip text state dict."""
    found = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def openclip_text_fields(state_dict: dict[str, Tensor], *, num_heads: int, drop_last_layers: int = 0,
                         hidden_act: str = "gelu") -> dict[str, Any]:
    """The CLIPTextConfig keys and values of an open_clip text tower; heads are not in the weights, so they are passed.

    hidden_act: "gelu" for open_clip's nn.GELU (OpenCLIP ViT-H/bigG), "quick_gelu" for OpenAI-trained towers.
    """
    state = text_tower_state_dict(state_dict)
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in state:
            raise ConversionError(f"missing key {key!r}: not an open_clip text tower state dict")
    vocab, width = state["token_embedding.weight"].shape
    if width % num_heads:
        raise ConversionError(f"width {width} is not divisible by num_heads {num_heads}")
    layers = _num_blocks(state) - drop_last_layers
    if layers < 1:
        raise ConversionError(f"drop_last_layers={drop_last_layers} leaves {layers} layers")
    proj = state.get("text_projection")
    return dict(
        vocab_size=int(vocab), hidden_size=int(width),
        intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=num_heads,
        max_position_embeddings=int(state["positional_embedding"].shape[0]),
        projection_dim=int(proj.shape[-1] if proj is not None and proj.ndim == 2 else width),
        hidden_act=hidden_act, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )


def openclip_text_config(state_dict: dict[str, Tensor], *, num_heads: int, drop_last_layers: int = 0,
                         hidden_act: str = "gelu") -> CLIPTextConfig:
    """transformers' CLIPTextConfig of an open_clip text tower (`openclip_text_fields`); ours is
    ldm.networks.clip_text.CLIPTextConfig(**openclip_text_fields(...))."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**openclip_text_fields(state_dict, num_heads=num_heads, drop_last_layers=drop_last_layers,
                                                 hidden_act=hidden_act))


def _split3(t: Tensor) -> list[Tensor]:
    return [c.clone() for c in t.chunk(3, dim=0)]


# one residual block's modules: open_clip's name -> CLIPTextModel's (attn.in_proj holds q, k, v stacked by rows);
# the key table below and the kohya LoRA names of SD 2.x's text encoder (ldm.lora.kohya) both read it
OPENCLIP_BLOCK_MODULES: dict[str, tuple[str, ...]] = {
    "ln_1": ("layer_norm1",),
    "attn.in_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.out_proj": ("self_attn.out_proj",),
    "ln_2": ("layer_norm2",),
    "mlp.c_fc": ("mlp.fc1",),
    "mlp.c_proj": ("mlp.fc2",),
}


def _key_table(config: CLIPTextConfig, with_projection: bool) -> list[tuple[list[str], list[str], tuple]]:
    """Rows (open_clip keys, transformers keys, open_clip shapes) for every tensor of the text tower."""
    d, f, v, c = config.hidden_size, config.intermediate_size, config.vocab_size, config.max_position_embeddings
    tm = "text_model."
    rows = [
        (["token_embedding.weight"], [tm + "embeddings.token_embedding.weight"], [(v, d)]),
        (["positional_embedding"], [tm + "embeddings.position_embedding.weight"], [(c, d)]),
        (["ln_final.weight", "ln_final.bias"], [tm + "final_layer_norm.weight", tm + "final_layer_norm.bias"],
         [(d,), (d,)]),
    ]
    shapes = {"ln_1": ((d,), (d,)), "attn.in_proj": ((3 * d, d), (3 * d,)), "attn.out_proj": ((d, d), (d,)),
              "ln_2": ((d,), (d,)), "mlp.c_fc": ((f, d), (f,)), "mlp.c_proj": ((d, f), (d,))}
    for i in range(config.num_hidden_layers):
        o, h = f"transformer.resblocks.{i}.", f"{tm}encoder.layers.{i}."
        for theirs, ours in OPENCLIP_BLOCK_MODULES.items():
            w, b = shapes[theirs]
            if len(ours) == 3:  # fused q/k/v: nn.MultiheadAttention's in_proj_weight / in_proj_bias parameters
                rows += [([o + theirs + "_weight"], [h + n + ".weight" for n in ours], [w]),
                         ([o + theirs + "_bias"], [h + n + ".bias" for n in ours], [b])]
            else:
                rows.append(([o + theirs + ".weight", o + theirs + ".bias"],
                             [h + ours[0] + ".weight", h + ours[0] + ".bias"], [w, b]))
    if with_projection:
        rows.append((["text_projection"], ["text_projection.weight"], [(d, config.projection_dim)]))
    return rows


def _check(key: str, tensor: Tensor | None, shape: tuple, where: str) -> Tensor:
    if tensor is None:
        raise ConversionError(f"missing key {key!r} in the {where} state dict (expected shape {shape})")
    if tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{key}: expected shape {tuple(shape)} from the config, got {tuple(tensor.shape)}")
    return tensor


def openclip_to_transformers(state_dict: dict[str, Tensor], config: CLIPTextConfig, *,
                             with_projection: bool = False) -> dict[str, Tensor]:
    """Map an open_clip text tower onto CLIPTextModel keys (CLIPTextModelWithProjection if with_projection).

    Blocks past config.num_hidden_layers are dropped on purpose (SD 2.x); any other leftover key is an error.
    """
    state = text_tower_state_dict(state_dict)
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for src_keys, dst_keys, shapes in _key_table(config, with_projection):
        tensors = [_check(k, state.get(k), s, "open_clip") for k, s in zip(src_keys, shapes)]
        used.update(src_keys)
        if len(dst_keys) == 3 and len(src_keys) == 1:  # fused q/k/v
            out.update(zip(dst_keys, _split3(tensors[0])))
        elif src_keys == ["text_projection"]:
            out[dst_keys[0]] = tensors[0].t().contiguous()
        else:
            out.update({k: t.clone() for k, t in zip(dst_keys, tensors)})
    dropped = re.compile(r"transformer\.resblocks\.(\d+)\.")
    unexpected = sorted(
        k for k in set(state) - used
        if not ((m := dropped.match(k)) and int(m.group(1)) >= config.num_hidden_layers)
        and not (k == "text_projection" and not with_projection)
    )
    if unexpected:
        raise ConversionError(f"unexpected open_clip key(s) with no transformers counterpart: {unexpected[:8]}")
    return out


def transformers_to_openclip(state_dict: dict[str, Tensor], config: CLIPTextConfig) -> dict[str, Tensor]:
    """The reverse map: CLIPTextModel(WithProjection) keys to an open_clip text tower (q/k/v fused again)."""
    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
             for k, v in state_dict.items() if not k.endswith("position_ids")}
    with_projection = "text_projection.weight" in state
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for src_keys, dst_keys, shapes in _key_table(config, with_projection):
        used.update(dst_keys)
        if len(dst_keys) == 3 and len(src_keys) == 1:
            d = config.hidden_size
            part = (d, d) if src_keys[0].endswith("weight") else (d,)
            parts = [_check(k, state.get(k), part, "transformers") for k in dst_keys]
            out[src_keys[0]] = torch.cat(parts, dim=0)
        elif src_keys == ["text_projection"]:
            t = _check(dst_keys[0], state.get(dst_keys[0]), shapes[0][::-1], "transformers")
            out[src_keys[0]] = t.t().contiguous()
        else:
            for sk, dk, s in zip(src_keys, dst_keys, shapes):
                out[sk] = _check(dk, state.get(dk), s, "transformers").clone()
    unexpected = sorted(set(state) - used)
    if unexpected:
        raise ConversionError(f"unexpected transformers key(s) with no open_clip counterpart: {unexpected[:8]}")
    return out
