"""The text-conditional U-Net of latent diffusion (Rombach et al. 2022, sec. 3.3), weight-compatible with diffusers'
UNet2DConditionModel: attribute names mirror its state-dict keys, so its weights load with strict=True."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.config import from_dict
from ldm.io import PretrainedMixin
from ldm.networks.feature_cache import FeatureCache
from ldm.networks.layers import Downsample2D, ResnetBlock2D, TimestepEmbedding, Timesteps, Transformer2DModel, Upsample2D

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MAX_SAMPLE_SIZE = 1024  # latent pixels (8192 image pixels at f = 8): a sane bound on the default size a config names

# diffusers config keys for features this U-Net does not implement, with the only value we accept for each.
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "act_fn": "silu", "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
}


def _per_block(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
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

    def __post_init__(self) -> None:
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
            values = _per_block(value, n)
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries but block_out_channels has {n}")
            if any(v < 1 for v in values):
                raise ValueError(f"{name} must be positive, got {value}")
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
        return _per_block(self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels))

    def layer_counts(self) -> Iterator[tuple[str, int, str]]:
        """(config key, count, the state-dict keys holding one per layer, N the index): which config key asks for
        more layers than a weight file holds (ldm.io.check_layer_counts); the block count first, as it bounds the
        rest."""
        n = len(self.block_out_channels)
        yield "block_out_channels", n, "down_blocks.N."
        layers, depth = (_per_block(v, n) for v in (self.layers_per_block, self.transformer_layers_per_block))
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


def _call(module: nn.Module, use_checkpoint: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """Run `module(*args)`, recomputing activations in backward (torch.utils.checkpoint) when asked."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def _transformer(cfg: UNetConfig, channels: int, heads: int, depth: int) -> Transformer2DModel:
    return Transformer2DModel(
        heads, channels // heads, channels, num_layers=depth, cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention, dropout=cfg.dropout,
    )


def _resnet(cfg: UNetConfig, c_in: int, c_out: int, temb: int, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(c_in, c_out, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                         output_scale_factor=scale)


class DownBlock(nn.Module):
    """diffusers CrossAttnDownBlock2D (with `attentions`) / DownBlock2D (without): keys `resnets.{i}`,
    `attentions.{i}`, `downsamplers.0`. Returns the output and every intermediate state for the skip connections."""

    def __init__(self, cfg: UNetConfig, i: int, c_in: int, temb: int, final: bool):
        super().__init__()
        c_out, n = cfg.block_out_channels[i], _per_block(cfg.layers_per_block, len(cfg.block_out_channels))[i]
        self.attentions = None  # registered before resnets, as diffusers does, so state-dict key order matches
        if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
            depth = _per_block(cfg.transformer_layers_per_block, len(cfg.block_out_channels))[i]
            self.attentions = nn.ModuleList([_transformer(cfg, c_out, cfg.heads[i], depth) for _ in range(n)])
        self.resnets = nn.ModuleList([_resnet(cfg, c_in if j == 0 else c_out, c_out, temb) for j in range(n)])
        self.downsamplers = None if final else nn.ModuleList([Downsample2D(c_out, c_out, cfg.downsample_padding)])

    def forward(
        self, x, temb, context, ckpt: bool = False, limit: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`limit`: stop after that many states (a cached call's shallow path, ldm.networks.feature_cache)."""
        states = []
        for j, resnet in enumerate(self.resnets):
            if len(states) == limit:
                return x, states
            x = _call(resnet, ckpt, x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = _call(self.attentions[j], ckpt, x, context)
            states.append(x)
        if self.downsamplers is not None and len(states) != limit:
            x = self.downsamplers[0](x)  # (B, C_out, H / 2, W / 2)
            states.append(x)
        return x, states


class MidBlock(nn.Module):
    """diffusers UNetMidBlock2DCrossAttn: keys `resnets.0`, `attentions.0`, `resnets.1` (resnet, transformer, resnet)."""

    def __init__(self, cfg: UNetConfig, temb: int):
        super().__init__()
        c = cfg.block_out_channels[-1]
        depth = _per_block(cfg.transformer_layers_per_block, len(cfg.block_out_channels))[-1]
        self.attentions = nn.ModuleList([_transformer(cfg, c, cfg.heads[-1], depth)])
        self.resnets = nn.ModuleList([_resnet(cfg, c, c, temb, cfg.mid_block_scale_factor) for _ in range(2)])

    def forward(self, x, temb, context, ckpt: bool = False) -> torch.Tensor:
        x = _call(self.resnets[0], ckpt, x, temb)
        x = _call(self.attentions[0], ckpt, x, context)
        return _call(self.resnets[1], ckpt, x, temb)


class UpBlock(nn.Module):
    """diffusers CrossAttnUpBlock2D / UpBlock2D: keys `resnets.{i}`, `attentions.{i}`, `upsamplers.0`; each resnet
    takes the previous output concatenated (on channels) with one skip state, the last-saved first."""

    def __init__(self, cfg: UNetConfig, i: int, temb: int, final: bool):
        super().__init__()
        n_blocks = len(cfg.block_out_channels)
        rev = cfg.block_out_channels[::-1]
        c_out, c_prev, c_skip_in = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, n_blocks - 1)]
        n = _per_block(cfg.layers_per_block, n_blocks)[::-1][i] + 1
        resnets = []
        for j in range(n):
            c_skip = c_skip_in if j == n - 1 else c_out
            resnets.append(_resnet(cfg, (c_prev if j == 0 else c_out) + c_skip, c_out, temb))
        self.attentions = None
        if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
            depth = _per_block(cfg.transformer_layers_per_block, n_blocks)[::-1][i]
            self.attentions = nn.ModuleList([_transformer(cfg, c_out, cfg.heads[::-1][i], depth) for _ in range(n)])
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = None if final else nn.ModuleList([Upsample2D(c_out, c_out)])

    def forward(self, x, skips: list[torch.Tensor], temb, context, ckpt: bool = False, size=None, first: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Resnets `first` .. `stop` - 1 (x: the input of resnet `first`), then the upsampler unless `stop` is given;
        each pops its skip off `skips`. Split at a resnet, a full call keeps the deep feature between the halves."""
        for j in range(first, len(self.resnets) if stop is None else stop):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = _call(self.resnets[j], ckpt, x, temb)  # (B, C_out, H, W)
            if self.attentions is not None:
                x = _call(self.attentions[j], ckpt, x, context)
        if stop is not None:
            return x
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)  # (B, C_out, 2H, 2W) or (B, C_out, *size)
        return x


class UNet(PretrainedMixin, nn.Module):
    """epsilon/v-prediction network eps_theta(z_t, t, c) of latent diffusion; mirrors UNet2DConditionModel's keys
    `conv_in`, `time_embedding`, `down_blocks`, `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        ch = config.block_out_channels
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(ch[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.down_blocks = nn.ModuleList(
            [DownBlock(config, i, ch[max(i - 1, 0)], temb, i == len(ch) - 1) for i in range(len(ch))]
        )
        self.up_blocks = nn.ModuleList([UpBlock(config, i, temb, i == len(ch) - 1) for i in range(len(ch))])
        self.mid_block = MidBlock(config, temb)  # after up_blocks: diffusers' state-dict key order
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, kernel_size=3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def _timesteps(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        """Timestep(s) as a (B,) tensor: a scalar or a (1,) tensor is broadcast over the batch."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0 or t.shape == (1,):
            return t.reshape(1).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch},), got shape {tuple(t.shape)}")
        return t

    @property
    def cache_branches(self) -> int:
        """Skip branches (= up resnets) DeepCache can cache at: FeatureCache depths 0 .. cache_branches - 1."""
        return sum(len(block.resnets) for block in self.up_blocks)

    def cache_site(self, depth: int) -> tuple[int, int]:
        """(up block i, resnet j) whose input is the deep feature of branch `depth` (0: the last resnet of all)."""
        nearer = 0  # up resnets between block i and the output
        for i in reversed(range(len(self.up_blocks))):
            n = len(self.up_blocks[i].resnets)
            if depth < nearer + n:
                return i, n - 1 - (depth - nearer)
            nearer += n
        raise ValueError(f"cache_depth {depth} is not below this U-Net's {self.cache_branches} skip branches")

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, encoder_hidden_states: torch.Tensor,
        cache: FeatureCache | None = None,
    ) -> torch.Tensor:
        """sample (B, in_channels, H, W), timestep scalar or (B,), encoder_hidden_states (B, L, cross_attention_dim)
        -> (B, out_channels, H, W). `cache`: DeepCache over a sampling run (ldm.networks.feature_cache): the call is
        full and keeps the deep feature, or runs only the shallow path on the kept one; None: always in full."""
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, H, W), got shape {tuple(sample.shape)}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != cross_attention_dim "
                f"{cfg.cross_attention_dim} (expected shape (B, L, {cfg.cross_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)})"
            )
        b = sample.shape[0]
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != sample batch {b}")
        ckpt = self.gradient_checkpointing  # only takes effect while autograd records (see _call)
        t = self._timesteps(timestep, b, sample.device)  # (B,)
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))  # (B, 4 * C0)

        # An odd size somewhere down the path: upsample to the skip's exact size rather than x2.
        factor = 2 ** (len(self.up_blocks) - 1)
        exact_sizes = any(s % factor for s in sample.shape[-2:])

        site, deep = (-1, 0), None  # DeepCache: the deep feature is the input of up block site[0]'s resnet site[1]
        if cache is not None:
            site = self.cache_site(cache.check(self.cache_branches).depth)
            deep = cache.lookup(sample, encoder_hidden_states)  # None: a full call
        limit = None if deep is None else cache.depth + 1  # a cached call makes skips 0 .. depth only

        x = self.conv_in(sample)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            if limit is not None and len(skips) == limit:
                break
            x, states = block(x, temb, encoder_hidden_states, ckpt, None if limit is None else limit - len(skips))
            skips.extend(states)
        if deep is None:
            x = self.mid_block(x, temb, encoder_hidden_states, ckpt)  # (B, C_last, H / f, W / f)
        for i, block in enumerate(self.up_blocks):
            n, first = len(block.resnets), site[1] if i == site[0] else 0
            if deep is not None:
                if i < site[0]:
                    continue  # below the deep feature
                if i == site[0]:
                    x, n = deep, n - first  # (B, C, H', W'): resnet `first`'s input, kept by the last full call
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if exact_sizes and i < len(self.up_blocks) - 1 else None
            if deep is None and i == site[0]:  # a full call with a cache: keep the input of resnet `first`
                x = block(x, block_skips, temb, encoder_hidden_states, ckpt, size, stop=first)
                cache.store(x, sample, encoder_hidden_states)
            x = block(x, block_skips, temb, encoder_hidden_states, ckpt, size, first=first)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))  # (B, out_channels, H, W)
