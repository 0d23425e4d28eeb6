"""Network building blocks shared by the U-Net and the KL autoencoder.

Attribute names mirror diffusers' modules one for one, so a diffusers state dict loads by name with
`load_state_dict(strict=True)`; each class docstring names the diffusers class and the keys it owns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017, sec. 3.5; DDPM): [sin(t w_k), cos(t w_k)], w_k = P^(-k/(d/2 - shift)).

    timesteps: (N,) int or float -> (N, dim) float32 (odd `dim` is zero-padded), as diffusers' get_timestep_embedding.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D (N,), got shape {tuple(timesteps.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - downscale_freq_shift))  # (half,)
    args = scale * (timesteps[:, None].float() * freqs[None, :])  # (N, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (N, 2 * half)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


class Timesteps(nn.Module):
    """diffusers `Timesteps` (no parameters): the sinusoidal projection of the timestep, `timestep_embedding`."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1.0):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift, scale=self.scale,
        )


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: linear_1 -> SiLU -> linear_2 (keys `linear_1`, `linear_2`)."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (time_embedding_norm="default"): keys `norm1`, `conv1`, `time_emb_proj` (absent when
    `temb_channels` is None, as in the VAE), `norm2`, `conv2`, `conv_shortcut` (1x1, only when channels change).

    out = (shortcut(x) + conv2(drop(SiLU(norm2(conv1(SiLU(norm1(x))) + proj(SiLU(temb))))))) / output_scale_factor.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        *,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = nn.SiLU()
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock2D has a time embedding projection; pass temb of shape (B, temb_channels)")
            h = h + self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers `Downsample2D` with use_conv=True: key `conv` (3x3, stride 2).

    padding=1 is the U-Net's symmetric padding; padding=0 is the VAE's variant, which first pads (0, 1, 0, 1) with zeros.
    """

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample2D expects {self.channels} channels, got {x.shape[1]}")
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)  # (B, C, H + 1, W + 1)
        return self.conv(x)  # (B, C_out, ceil(H / 2), ceil(W / 2)); floor(H / 2) with padding 0


class Upsample2D(nn.Module):
    """diffusers `Upsample2D` with use_conv=True: nearest-neighbour x2 (or to `output_size`), then key `conv` (3x3)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, out_channels or channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample2D expects {self.channels} channels, got {x.shape[1]}")
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")  # (B, C, *output_size)
        return self.conv(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *, upcast: bool = False) -> torch.Tensor:
    """Multi-head softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017, eq. 1) via scaled_dot_product_attention.

    q: (B, N, heads * d), k and v: (B, M, heads * d) -> (B, N, heads * d). `upcast` computes in float32.
    """
    b, n, inner = q.shape
    d = inner // heads
    dtype = q.dtype
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, N|M, d)
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


class Attention(nn.Module):
    """diffusers `Attention` with AttnProcessor2_0: keys `to_q`, `to_k`, `to_v`, `to_out.0` and, when `norm_num_groups`
    is set, `group_norm`.

    Self-attention when `encoder_hidden_states` is None, cross-attention over it otherwise. A 4-D input (B, C, H, W) is
    attended over its H*W positions and returned as (B, C, H, W); with `residual_connection` the input is added back
    (the VAE mid-block: Attention(C, heads=1, dim_head=C, norm_num_groups=32, eps=1e-6, bias=True,
    residual_connection=True)).
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        *,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.query_dim = query_dim
        self.cross_attention_dim = cross_attention_dim or query_dim
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (
            nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups is not None else None
        )
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, inner, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(
                f"attention context width {context.shape[-1]} != cross_attention_dim {self.cross_attention_dim}"
            )
        out = attention(
            self.to_q(hidden_states), self.to_k(context), self.to_v(context), self.heads, upcast=self.upcast_attention
        )  # (B, N, inner)
        out = self.to_out[1](self.to_out[0](out))  # (B, N, query_dim)
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor


class GEGLU(nn.Module):
    """diffusers `GEGLU`: key `proj`; GEGLU(x) = a * GELU(g), [a, g] = proj(x) (Shazeer 2020, eq. 6)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers `FeedForward` (activation_fn="geglu"): keys `net.0.proj` (GEGLU), `net.2` (output linear)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (norm_type="layer_norm", geglu): keys `norm1`/`attn1` (self-attention),
    `norm2`/`attn2` (cross-attention over text tokens; absent when cross_attention_dim is None), `norm3`/`ff`.

    Pre-norm residual: x += attn1(LN(x)); x += attn2(LN(x), c); x += ff(LN(x)). With `only_cross_attention` (the x4
    upscaler) attn1 attends to c too: x += attn1(LN(x), c).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cross_attention_dim: int | None = None,
        *,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        only_cross_attention: bool = False,
    ):
        super().__init__()
        if only_cross_attention and cross_attention_dim is None:
            raise ValueError("only_cross_attention needs a cross_attention_dim (attn1 attends to the context)")
        kw = dict(heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                  upcast_attention=upcast_attention)
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **kw)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = Attention(dim, cross_attention_dim, **kw)
        else:
            self.norm2, self.attn2 = None, None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), encoder_hidden_states if self.only_cross_attention else None)  # (B, N, dim)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` with continuous input (the spatial transformer of Rombach et al. 2022):
    keys `norm` (GroupNorm, eps 1e-6), `proj_in`, `transformer_blocks.{i}`, `proj_out`.

    proj_in/proj_out are 1x1 convolutions, or linear layers when `use_linear_projection` (SD 2.x); the output is
    added to the input.
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
        only_cross_attention: bool = False,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        proj = nn.Linear if use_linear_projection else lambda a, b: nn.Conv2d(a, b, kernel_size=1)
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, num_attention_heads, attention_head_dim, cross_attention_dim,
                                  dropout=dropout, upcast_attention=upcast_attention,
                                  only_cross_attention=only_cross_attention)
            for _ in range(num_layers)
        ])
        self.proj_out = proj(inner, in_channels)

    def forward(self, x: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, -1))  # (B, HW, inner)
        else:
            x = self.proj_in(x)  # (B, inner, H, W)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, inner)
        for block in self.transformer_blocks:
            x = block(x, encoder_hidden_states)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W), NCHW strides
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return x + residual
