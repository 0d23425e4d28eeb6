"""Key maps between the original CompVis/Stability single-file layout and ours (= diffusers' names).

A map is a list of (ours, theirs) module-prefix pairs generated from the model config; renaming a key replaces its
longest matching prefix. The same table serves both directions, so loading and saving cannot drift apart. The only
tensor change is the VAE mid-block attention, stored as 1x1 convolutions in CompVis files and as linear layers here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from ldm.io import WeightsError

PrefixMap = list[tuple[str, str]]  # (ours, theirs)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: a transformers CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: an OpenCLIP text tower

_RESNET: PrefixMap = [
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"),
]  # fmt: skip
_VAE_RESNET: PrefixMap = [("conv_shortcut", "nin_shortcut")]
_VAE_ATTENTION: PrefixMap = [
    ("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"),
]  # fmt: skip


def _per_block(value: int | Sequence[int], n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _nest(outer: str, theirs_outer: str, inner: PrefixMap) -> PrefixMap:
    return [(f"{outer}.{a}", f"{theirs_outer}.{b}") for a, b in inner]


def unet_prefix_map(
    block_out_channels: Sequence[int],
    layers_per_block: int | Sequence[int],
    down_block_types: Sequence[str],
    up_block_types: Sequence[str],
) -> PrefixMap:
    """Module-prefix pairs (ours, CompVis) for a UNet2DConditionModel-shaped U-Net."""
    n = len(block_out_channels)
    layers = _per_block(layers_per_block, n)
    pairs: PrefixMap = [
        ("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
    ]  # fmt: skip
    k = 1
    for i in range(n):
        for j in range(layers[i]):
            pairs.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0"))
            if "CrossAttn" in down_block_types[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{k}.1"))
            k += 1
        if i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{k}.0.op"))
            k += 1
    pairs += [
        ("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
        ("mid_block.resnets.1", "middle_block.2"),
    ]  # fmt: skip
    up_layers = list(reversed(layers))
    k = 0
    for i in range(n):
        has_attn = "CrossAttn" in up_block_types[i]
        for j in range(up_layers[i] + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0"))
            if has_attn:
                pairs.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{k}.1"))
            if i < n - 1 and j == up_layers[i]:
                pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{k}.{2 if has_attn else 1}.conv"))
            k += 1
    resnet_prefixes = [(a, b) for a, b in pairs if ".resnets." in a]
    for a, b in resnet_prefixes:
        pairs += _nest(a, b, _RESNET)
    return pairs


def vae_prefix_map(block_out_channels: Sequence[int], layers_per_block: int) -> PrefixMap:
    """Module-prefix pairs (ours, CompVis) for an AutoencoderKL-shaped VAE."""
    n = len(block_out_channels)
    pairs: PrefixMap = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out", f"{part}.norm_out")]
        pairs += [(f"{part}.mid_block.resnets.{r}", f"{part}.mid.block_{r + 1}") for r in range(2)]
        pairs += _nest(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
    for i in range(n):
        for j in range(layers_per_block):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}"))
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        theirs = n - 1 - i  # CompVis numbers decoder levels from the highest resolution
        for j in range(layers_per_block + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{theirs}.block.{j}"))
        if i < n - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{theirs}.upsample.conv"))
    for a, b in [p for p in pairs if ".resnets." in p[0]]:
        pairs += _nest(a, b, _VAE_RESNET)
    return pairs


def rename(
    state_dict: Mapping[str, torch.Tensor], pairs: PrefixMap, direction: Literal["to_ours", "to_theirs"]
) -> dict[str, torch.Tensor]:
    """Rename keys by their longest matching module prefix; keys matching no prefix keep their name. Each key looks
    up its own dotted prefixes, longest first: the time is the keys', whatever the size of the map a config asks."""
    src, dst = (1, 0) if direction == "to_ours" else (0, 1)
    table: dict[str, str] = {}
    for p in pairs:
        table.setdefault(p[src], p[dst])
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        dots = [i for i, c in enumerate(key) if c == "."]
        for end in (len(key), *reversed(dots)):
            if key[:end] in table:
                new = table[key[:end]] + key[end:]
                break
        if new in out:
            raise WeightsError(f"two keys map to {new!r} (one of them is {key!r})")
        out[new] = value
    return out


def _vae_attention_to_linear(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis stores the VAE attention q/k/v/proj_out as 1x1 convolutions (C, C, 1, 1); ours are linear (C, C)."""
    linear = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
    return {k: (v[:, :, 0, 0] if k.endswith(linear) and v.ndim == 4 else v) for k, v in sd.items()}


def _vae_attention_to_conv(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    conv = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")
    return {
        k: (v[:, :, None, None] if ".attn_1." in k and k.endswith(conv) and v.ndim == 2 else v) for k, v in sd.items()
    }


def split_single_file(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file checkpoint into its parts by prefix: unet, vae, clip or open_clip (prefixes removed)."""
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "clip": {}, "open_clip": {}}
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip": CLIP_PREFIX, "open_clip": OPENCLIP_PREFIX}
    for key, value in state_dict.items():
        for part, prefix in prefixes.items():
            if key.startswith(prefix):
                parts[part][key[len(prefix):]] = value
                break
    if not parts["unet"]:
        raise WeightsError(
            f"not a Stable Diffusion single-file checkpoint: no key starts with {UNET_PREFIX!r} "
            f"(first keys: {list(state_dict)[:5]})"
        )
    return parts


def unet_from_compvis(sd: Mapping[str, torch.Tensor], pairs: PrefixMap) -> dict[str, torch.Tensor]:
    """CompVis U-Net keys (without `model.diffusion_model.`) -> ours."""
    return rename(sd, pairs, "to_ours")


def unet_to_compvis(sd: Mapping[str, torch.Tensor], pairs: PrefixMap) -> dict[str, torch.Tensor]:
    """Our U-Net keys -> CompVis (without `model.diffusion_model.`)."""
    return rename(sd, pairs, "to_theirs")


def vae_from_compvis(sd: Mapping[str, torch.Tensor], pairs: PrefixMap) -> dict[str, torch.Tensor]:
    """CompVis VAE keys (without `first_stage_model.`) -> ours, 1x1-conv attention weights made linear."""
    return _vae_attention_to_linear(rename(sd, pairs, "to_ours"))


def vae_to_compvis(sd: Mapping[str, torch.Tensor], pairs: PrefixMap) -> dict[str, torch.Tensor]:
    """Our VAE keys -> CompVis (without `first_stage_model.`), attention weights as 1x1 convolutions."""
    return _vae_attention_to_conv(rename(sd, pairs, "to_theirs"))


def clip_from_compvis(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x text encoder keys are transformers' CLIPTextModel keys already (`text_model.*`)."""
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}
