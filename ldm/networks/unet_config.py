"""The U-Net's configuration: diffusers' UNet2DConditionModel config keys, checked, with the layer counts a weight
file must hold (ldm.io.check_layer_counts)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ldm.config import from_dict
from ldm.networks.added_conditioning import check_text_time_config

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MAX_SAMPLE_SIZE = 1024  # latent pixels (8192 image pixels at f = 8): a sane bound on the default size a config names

# diffusers config keys for features this U-Net does not implement, with the only value we accept for each.
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu",
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
}


def per_block(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return (value,) * n if isinstance(value, int) else tuple(value)


@dataclass
class UNetConfig:
    """Shape of the U-Net; field names and meanings are diffusers' UNet2DConditionModel config keys.

    `attention_head_dim` follows SD 1.x/diffusers semantics: it is the number of heads per block (head width =
    channels / heads). `num_attention_heads`, when set, is the same thing under its honest name and wins.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    # SDXL: the pooled text embedding and micro-conditioning added to the time embedding (ldm.networks.added_conditioning)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # the x4 upscaler's: attn1 attends to the text instead of the image, per down block (up blocks: reversed), and an
    # nn.Embedding of class labels (its noise level) added to the time embedding
    only_cross_attention: bool | tuple[bool, ...] = False
    num_class_embeds: int | None = None

    def __post_init__(self) -> None:
        check_text_time_config(self.addition_embed_type, self.addition_time_embed_dim,
                               self.projection_class_embeddings_input_dim)
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels must not be empty")
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but block_out_channels has {n}")
        for name, valid in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, name) if t not in valid]
            if bad:
                raise ValueError(f"{name}: unsupported block type(s) {bad}; valid: {list(valid)}")
        for name in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads"):
            value = getattr(self, name)
            if value is None:
                continue
            values = per_block(value, n)
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but block_out_channels has {n}")
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must be positive, got {value}")
        if len(self.cross_only) != n:
            raise ValueError(f"only_cross_attention has {len(self.cross_only)} entries but block_out_channels has {n}")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            raise ValueError(f"num_class_embeds must be positive or None, got {self.num_class_embeds}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels entry {c} is not divisible by norm_num_groups {self.norm_num_groups}")
        for c, h in zip(self.block_out_channels, self.heads):
            if c % h:
                raise ValueError(f"block channels {c} are not divisible by the number of attention heads {h}")
        for name in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.sample_size > MAX_SAMPLE_SIZE:  # the default image size: latents of sample_size^2 at generate time
            raise ValueError(f"sample_size {self.sample_size} is past {MAX_SAMPLE_SIZE} latent pixels (SD 1.x: 64, "
                             "SDXL: 128)")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers: `num_attention_heads or attention_head_dim`)."""
        return per_block(self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels))

    @property
    def cross_only(self) -> tuple[bool, ...]:
        """only_cross_attention per down block (diffusers: a bool applies to every block)."""
        value = self.only_cross_attention
        return (value,) * len(self.block_out_channels) if isinstance(value, bool) else tuple(value)

    def layer_counts(self) -> Iterator[tuple[str, int, str]]:
        """(config key, count, the state-dict keys holding one per layer, N the index): which config key asks for
        more layers than a weight file holds (ldm.io.check_layer_counts); the block count first, as it bounds the
        rest."""
        n = len(self.block_out_channels)
        yield "block_out_channels", n, "down_blocks.N."
        layers, depth = (per_block(v, n) for v in (self.layers_per_block, self.transformer_layers_per_block))
        for i in range(n):
            yield "layers_per_block", layers[i], f"down_blocks.{i}.resnets.N."
        yield "transformer_layers_per_block", depth[-1], "mid_block.attentions.0.transformer_blocks.N."
        for i, kind in enumerate(self.down_block_types):
            if kind == "CrossAttnDownBlock2D":
                yield "transformer_layers_per_block", depth[i], f"down_blocks.{i}.attentions.0.transformer_blocks.N."
        for i, kind in enumerate(self.up_block_types):
            if kind == "CrossAttnUpBlock2D":
                yield ("transformer_layers_per_block", depth[::-1][i],
                       f"up_blocks.{i}.attentions.0.transformer_blocks.N.")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """Build from a diffusers UNet2DConditionModel config.json dict; unsupported features raise, naming the key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        ours: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_") or (key == "sample_size" and value is None):
                continue  # _class_name, _diffusers_version, _name_or_path; no sample_size: keep our default
            if key in fields and not (key == "num_attention_heads" and value is None):
                if key == "cross_attention_dim" and isinstance(value, (list, tuple)):
                    if len(set(value)) != 1:
                        raise ValueError(f"cross_attention_dim per block {value} is not supported (one width only)")
                    value = value[0]
                ours[key] = value
            elif key in _FIXED_DIFFUSERS_KEYS:
                expected = _FIXED_DIFFUSERS_KEYS[key]
                if value != expected and not (key == "act_fn" and value == "swish"):
                    raise ValueError(f"diffusers config {key}={value!r} is not supported (only {expected!r})")
            else:
                raise ValueError(f"unknown diffusers UNet2DConditionModel config key {key!r}")
        if isinstance(ours.get("sample_size"), (list, tuple)):
            raise ValueError(f"sample_size {ours['sample_size']} must be a single int")
        return from_dict(cls, ours)

    def to_diffusers(self) -> dict[str, Any]:
        """A dict that diffusers' UNet2DConditionModel.from_config accepts (it refuses num_attention_heads, so the
        head count is written as attention_head_dim, as SD checkpoints do)."""
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel"}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "num_attention_heads"})
        out["attention_head_dim"] = self.num_attention_heads or self.attention_head_dim
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
