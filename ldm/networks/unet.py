"""The text-conditional U-Net of latent diffusion (Rombach et al. 2022, sec. 3.3), weight-compatible with diffusers'
UNet2DConditionModel: attribute names mirror its state-dict keys, so its weights load with strict=True."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.io import PretrainedMixin
from ldm.networks.added_conditioning import text_time_embedding, text_time_modules
from ldm.networks.feature_cache import FeatureCache
from ldm.networks.layers import Downsample2D, ResnetBlock2D, TimestepEmbedding, Timesteps, Transformer2DModel, Upsample2D
from ldm.networks.unet_config import UNetConfig, per_block  # noqa: F401  (UNetConfig: imported from here too)

def _call(module: nn.Module, use_checkpoint: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """Run `module(*args)`, recomputing activations in backward (torch.utils.checkpoint) when asked."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def _transformer(cfg: UNetConfig, channels: int, heads: int, depth: int, cross_only: bool = False
                 ) -> Transformer2DModel:
    return Transformer2DModel(
        heads, channels // heads, channels, num_layers=depth, cross_attention_dim=cfg.cross_attention_dim,
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention, dropout=cfg.dropout, only_cross_attention=cross_only,
    )


def class_embedding(embedding: nn.Embedding, labels: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The class embedding (B, temb) of integer labels (a scalar or (B,)) in [0, num_class_embeds): diffusers'
    `class_embedding(class_labels)` (num_class_embeds; the x4 upscaler's labels are its noise level)."""
    n = embedding.num_embeddings
    if labels is None:
        raise ValueError(f"this U-Net has a class embedding (num_class_embeds={n}): pass class_labels ({batch},)")
    labels = torch.as_tensor(labels, device=embedding.weight.device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
    labels = labels.reshape(1).expand(batch) if labels.ndim == 0 or labels.shape == (1,) else labels
    if labels.shape != (batch,):
        raise ValueError(f"class_labels must be a scalar or of shape ({batch},), got shape {tuple(labels.shape)}")
    if labels.device.type == "cpu" and bool(((labels < 0) | (labels >= n)).any()):  # no host sync on accelerators
        raise ValueError(f"class_labels must lie in [0, {n - 1}] (num_class_embeds={n}), got {labels.tolist()}")
    return embedding(labels.long())


def _resnet(cfg: UNetConfig, c_in: int, c_out: int, temb: int, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(c_in, c_out, temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                         output_scale_factor=scale)


class DownBlock(nn.Module):
    """diffusers CrossAttnDownBlock2D (with `attentions`) / DownBlock2D (without): keys `resnets.{i}`,
    `attentions.{i}`, `downsamplers.0`. Returns the output and every intermediate state for the skip connections."""

    def __init__(self, cfg: UNetConfig, i: int, c_in: int, temb: int, final: bool):
        super().__init__()
        c_out, n = cfg.block_out_channels[i], per_block(cfg.layers_per_block, len(cfg.block_out_channels))[i]
        self.attentions = None  # registered before resnets, as diffusers does, so state-dict key order matches
        if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
            depth = per_block(cfg.transformer_layers_per_block, len(cfg.block_out_channels))[i]
            self.attentions = nn.ModuleList([_transformer(cfg, c_out, cfg.heads[i], depth, cfg.cross_only[i])
                                             for _ in range(n)])
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
        depth = per_block(cfg.transformer_layers_per_block, len(cfg.block_out_channels))[-1]
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
        n = per_block(cfg.layers_per_block, n_blocks)[::-1][i] + 1
        resnets = []
        for j in range(n):
            c_skip = c_skip_in if j == n - 1 else c_out
            resnets.append(_resnet(cfg, (c_prev if j == 0 else c_out) + c_skip, c_out, temb))
        self.attentions = None
        if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
            depth = per_block(cfg.transformer_layers_per_block, n_blocks)[::-1][i]
            heads, cross_only = cfg.heads[::-1][i], cfg.cross_only[::-1][i]
            self.attentions = nn.ModuleList([_transformer(cfg, c_out, heads, depth, cross_only) for _ in range(n)])
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
        if config.num_class_embeds is not None:  # the x4 upscaler's noise level (`class_embedding`)
            self.class_embedding = nn.Embedding(config.num_class_embeds, temb)
        if config.addition_embed_type == "text_time":  # SDXL (ldm.networks.added_conditioning)
            self.add_time_proj, self.add_embedding = text_time_modules(
                config.addition_time_embed_dim, config.projection_class_embeddings_input_dim, temb,
                config.flip_sin_to_cos, config.freq_shift)
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
        cache: FeatureCache | None = None, *, text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample (B, in_channels, H, W), timestep scalar or (B,), encoder_hidden_states (B, L, cross_attention_dim)
        -> (B, out_channels, H, W). `cache`: DeepCache over a sampling run (ldm.networks.feature_cache): the call is
        full and keeps the deep feature, or runs only the shallow path on the kept one; None: always in full.
        `text_embeds` (B, P), `time_ids` (B, 6; the refiner: 5): SDXL's added conditions (addition_embed_type
        "text_time" only; ldm.networks.added_conditioning).
        `class_labels` (B,) integers: the class embedding's (num_class_embeds only; the x4 upscaler's noise level)."""
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
        if cfg.num_class_embeds is not None:
            temb = temb + class_embedding(self.class_embedding, class_labels, b).to(temb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels are for U-Nets with a class embedding (num_class_embeds), this one has none")
        if cfg.addition_embed_type == "text_time":
            temb = temb + text_time_embedding(self.add_time_proj, self.add_embedding, text_embeds, time_ids, b,
                                              temb.dtype)  # SDXL: pooled text and micro-conditioning
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds / time_ids are for U-Nets with addition_embed_type 'text_time' (SDXL)")

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
