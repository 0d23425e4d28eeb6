"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, sec. 3), weight-compatible with diffusers.

Module attribute names mirror diffusers' `AutoencoderKL` state-dict keys (`encoder.down_blocks.0.resnets.0.conv1`,
`encoder.mid_block.attentions.0.to_q`, `quant_conv`, `decoder.up_blocks.0.upsamplers.0.conv`, ...), so a diffusers
state dict loads with `load_state_dict(strict=True)`. Images are (B, C, H, W) with H and W multiples of
`config.downsample_factor` = 2^(len(block_out_channels) - 1); latents are (B, latent_channels, H / f, W / f).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from autoencoder.distribution import DiagonalGaussian
from autoencoder.tiling import tiled_apply
from ldm.io import PretrainedMixin
from ldm.networks.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from ldm.random import Generator

VAE_EPS = 1e-6  # GroupNorm epsilon of every VAE normalization (diffusers' resnet_eps)

# diffusers' AutoencoderKL.__init__ defaults, used for keys a diffusers config leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}


@dataclass
class VAEConfig:
    """Shape of the KL autoencoder; defaults are Stable Diffusion 1.x/2.x's VAE (f = 8, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one block")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups != 0]
        if bad:
            raise ValueError(
                f"every block_out_channels entry must be divisible by norm_num_groups={self.norm_num_groups}; "
                f"{bad} are not"
            )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn {self.act_fn!r} is not supported; the VAE blocks use 'silu' (= 'swish')")
        if self.sample_size < 1 or self.sample_size % self.downsample_factor != 0:
            raise ValueError(
                f"sample_size must be a positive multiple of the downsampling factor {self.downsample_factor}, "
                f"got {self.sample_size}"
            )
        if self.scaling_factor <= 0:
            raise ValueError(f"scaling_factor must be > 0, got {self.scaling_factor}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} has {len(v)} entries, expected latent_channels={self.latent_channels}")

    @property
    def downsample_factor(self) -> int:
        """Spatial factor f between images and latents: 2^(number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def layer_counts(self) -> Iterator[tuple[str, int, str]]:
        """(config key, count, the state-dict keys holding one per layer, N the index): which config key asks for
        more layers than a weight file holds (ldm.io.check_layer_counts); the block count first, as it bounds the
        rest."""
        yield "block_out_channels", len(self.block_out_channels), "encoder.down_blocks.N."
        for i in range(len(self.block_out_channels)):
            yield "layers_per_block", self.layers_per_block, f"encoder.down_blocks.{i}.resnets.N."

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VAEConfig:
        """Build from a diffusers AutoencoderKL config dict (config.json); names any key or block type we lack."""
        data = {k: v for k, v in config.items() if not k.startswith("_")}
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(data.pop(key, [block]))
            if any(t != block for t in types):
                raise ValueError(f"{key}: only {block} is supported, got {types}")
            n = len(data.get("block_out_channels", _DIFFUSERS_DEFAULTS["block_out_channels"]))
            if len(types) != n:
                raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {n}")
        unknown = sorted(set(data) - set(_DIFFUSERS_DEFAULTS))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config key(s) {unknown}; known: {sorted(_DIFFUSERS_DEFAULTS)}")
        merged = {**_DIFFUSERS_DEFAULTS, **data}
        size = merged["sample_size"]
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square sample_size is supported, got {list(size)}")
            merged["sample_size"] = int(size[0])
        for key in ("block_out_channels", "latents_mean", "latents_std"):
            if merged[key] is not None:
                merged[key] = tuple(merged[key])
        return cls(**merged)

    def to_diffusers(self) -> dict[str, Any]:
        """A dict that diffusers' `AutoencoderKL.from_config` accepts, describing the same network."""
        n = len(self.block_out_channels)
        out: dict[str, Any] = {"_class_name": "AutoencoderKL"}
        out["down_block_types"] = ["DownEncoderBlock2D"] * n
        out["up_block_types"] = ["UpDecoderBlock2D"] * n
        for key in _DIFFUSERS_DEFAULTS:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` of the VAE: keys `resnets.0`, `attentions.0` (single-head self-attention with
    `group_norm` and a residual connection, or absent), `resnets.1`."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=VAE_EPS) for _ in range(2)
        ])
        attn = Attention(
            channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=VAE_EPS, residual_connection=True
        ) if add_attention else None
        self.attentions = nn.ModuleList([attn])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)  # (B, C, h, w), attention over the h*w positions
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """diffusers `DownEncoderBlock2D`: keys `resnets.{i}` and, except in the last block, `downsamplers.0.conv`."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=groups, eps=VAE_EPS)
            for i in range(num_layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, out_ch, padding=0)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H / 2, W / 2)
        return x


class DecoderBlock(nn.Module):
    """diffusers `UpDecoderBlock2D`: keys `resnets.{i}` and, except in the last block, `upsamplers.0.conv`."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=groups, eps=VAE_EPS)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch, out_ch)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2H, 2W)
        return x


def _run(block: nn.Module, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """Call `block`, recomputing its activations in the backward pass when `checkpointed` (Chen et al. 2016)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class Encoder(nn.Module):
    """conv_in -> down_blocks -> mid_block -> conv_norm_out -> SiLU -> conv_out (2 * latent channels: mean, logvar)."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        ch, g, n = c.block_out_channels, c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, downsample=i < n - 1) for i in range(n)
        ])
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = _run(block, h, self.gradient_checkpointing)
        h = _run(self.mid_block, h, self.gradient_checkpointing)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, 2 * latent, H / f, W / f)


class Decoder(nn.Module):
    """conv_in -> mid_block -> up_blocks (layers_per_block + 1 resnets each) -> conv_norm_out -> SiLU -> conv_out."""

    def __init__(self, c: VAEConfig) -> None:
        super().__init__()
        ch, g, n = tuple(reversed(c.block_out_channels)), c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            DecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)
        ])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=VAE_EPS)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, kernel_size=3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = _run(self.mid_block, h, self.gradient_checkpointing)
        for block in self.up_blocks:
            h = _run(block, h, self.gradient_checkpointing)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))  # (B, out_channels, H, W)


class AutoencoderKL(PretrainedMixin, nn.Module):
    """Encoder -> quant_conv -> q(z|x) = DiagonalGaussian; z -> post_quant_conv -> Decoder (Rombach et al. 2022)."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or VAEConfig()
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1) if c.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1) if c.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_size = c.sample_size
        self.tile_overlap = 0.25

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    # ----- switches -----
    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time (same numbers, less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_size: int | None = None, overlap: float = 0.25) -> None:
        """Process images larger than `tile_sample_size` (default config.sample_size) pixels in overlapping tiles.

        Tiles are tile_sample_size pixels (tile_sample_size / f latents) wide, start every (1 - overlap) of a tile and
        are cross-faded linearly over overlap * tile, as diffusers' AutoencoderKL tiled_encode / tiled_decode.
        """
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        f = self.downsample_factor
        latent = size // f
        if size < f or size % f != 0 or not 0.0 <= overlap < 1.0:
            raise ValueError(f"tile_sample_size must be a positive multiple of {f} and 0 <= overlap < 1, got {size}, {overlap}")
        if int(latent * (1 - overlap)) * f != size - int(size * overlap) or int(size * (1 - overlap)) != f * (
            latent - int(latent * overlap)
        ):
            raise ValueError(f"tile_sample_size={size} with overlap={overlap} does not tile evenly at factor {f}; "
                             f"use a multiple of {4 * f} with overlap 0.25")
        self.tile_sample_size, self.tile_overlap, self.use_tiling = size, overlap, True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder/decoder block activations in backward instead of storing them."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    # ----- checks -----
    def _check(self, x: torch.Tensor, channels: int, what: str, factor: int) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"{what} must have {channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h % factor or w % factor:
            def near(s: int) -> str:
                lo, hi = s // factor * factor, -(-s // factor) * factor
                return f"{lo} or {hi}" if lo else f"{hi}"
            raise ValueError(
                f"{what} height and width must be multiples of {factor} (the VAE downsamples by {factor}); "
                f"got {h}x{w}; nearest valid: height {near(h)}, width {near(w)}"
            )

    # ----- encode / decode -----
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        size = self.tile_sample_size
        if self.use_tiling and max(x.shape[-2:]) > size:
            latent = size // self.downsample_factor
            blend = int(latent * self.tile_overlap)
            return tiled_apply(self._encode_tile, x, size, int(size * (1 - self.tile_overlap)), blend, latent - blend)
        return self._encode_tile(x)

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images (B, in_channels, H, W) -> posterior q(z | x) over latents (B, latent_channels, H / f, W / f)."""
        self._check(x, self.config.in_channels, "encode: image", self.downsample_factor)
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode(s) for s in x.split(1)]))
        return DiagonalGaussian(self._encode(x))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        latent = self.tile_sample_size // self.downsample_factor
        if self.use_tiling and max(z.shape[-2:]) > latent:
            blend = int(self.tile_sample_size * self.tile_overlap)
            stride = int(latent * (1 - self.tile_overlap))
            return tiled_apply(self._decode_tile, z, latent, stride, blend, self.tile_sample_size - blend)
        return self._decode_tile(z)

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, h, w) -> images (B, out_channels, h * f, w * f)."""
        self._check(z, self.config.latent_channels, "decode: latent", 1)
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode(s) for s in z.split(1)])
        return self._decode(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: Generator = None) -> torch.Tensor:
        """Reconstruction decode(z), z ~ q(z | x) if `sample_posterior` else its mode."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ----- latent scaling for the diffusion model -----
    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - shift_factor) * scaling_factor: unit-variance latents for diffusion (Rombach et al. 2022, sec. 4.3.2)."""
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `scale_latents`: z / scaling_factor + shift_factor, ready for `decode`."""
        shift = self.config.shift_factor or 0.0
        return z / self.config.scaling_factor + shift
