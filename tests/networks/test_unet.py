"""The U-Net and its building blocks against diffusers with the same (seeded, random) weights loaded by name, strict.

Tolerances: building blocks and full U-Nets in fp32 on CPU must agree to max abs error <= 1e-5 (the assignment's
bound; observed 0 to ~4e-7). Gradient checkpointing must reproduce gradients exactly (recomputation is deterministic
on CPU, dropout RNG is replayed by torch.utils.checkpoint).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention as DAttention
from diffusers.models.downsampling import Downsample2D as DDownsample2D
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.resnet import ResnetBlock2D as DResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel as DTransformer2DModel
from diffusers.models.upsampling import Upsample2D as DUpsample2D

from ldm.networks import layers as L
from ldm.config import ConfigError, load_config
from ldm.networks.unet import UNet, UNetConfig

TOL = 1e-5
CONFIG_DIR = Path(__file__).resolve().parents[2] / "ldm" / "configs"

# Three tiny configurations: SD 1.x-like (attention_head_dim = head count, conv projections), SD 2.x-like (linear
# projections, per-block heads giving head width 16, upcast attention) and an uneven one (channel multipliers 1, 3, 2,
# layers per block 1, 3, 2, transformer depth 2, 1, 3, cross-attention blocks at both ends).
CONFIGS = {
    "sd1": UNetConfig(
        sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, attention_head_dim=4,
        cross_attention_dim=24, norm_num_groups=8,
    ),
    "sd2": UNetConfig(
        sample_size=8, block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=1, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, upcast_attention=True, cross_attention_dim=40, norm_num_groups=8,
    ),
    "uneven": UNetConfig(
        sample_size=8, block_out_channels=(16, 48, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 3, 2),
        transformer_layers_per_block=(2, 1, 3), attention_head_dim=(2, 3, 4), cross_attention_dim=24,
        norm_num_groups=8, freq_shift=1, flip_sin_to_cos=False, mid_block_scale_factor=2.0,
    ),
}


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with seeded N(0, std^2) noise (so norms' affine terms and biases matter too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def pair(ours: torch.nn.Module, theirs: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    randomize(theirs).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.eval(), theirs


def max_err(a: torch.Tensor, b) -> float:
    b = getattr(b, "sample", b)
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(flip: bool, shift: float, dim: int) -> None:
    t = torch.tensor([0, 1, 17, 999])
    ours = L.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert max_err(ours, get_timestep_embedding(t, dim, flip, shift)) == 0.0
    # closed form at t = 0: sin(0) = 0 and cos(0) = 1 in their halves
    half = dim // 2
    first, second = ours[0, :half], ours[0, half : 2 * half]
    cos_half, sin_half = (first, second) if flip else (second, first)
    assert torch.equal(cos_half, torch.ones(half)) and torch.equal(sin_half, torch.zeros(half))
    tf = torch.tensor([2.5])
    assert max_err(L.timestep_embedding(tf, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift),
                   get_timestep_embedding(tf, dim, flip, shift)) == 0.0


@pytest.mark.parametrize("c_in,c_out,temb", [(16, 32, 24), (16, 16, 24), (16, 16, None)])
def test_resnet_block_matches_diffusers(c_in: int, c_out: int, temb: int | None) -> None:
    ours, theirs = pair(
        L.ResnetBlock2D(c_in, c_out, temb, groups=4, eps=1e-6, output_scale_factor=1.5),
        DResnetBlock2D(in_channels=c_in, out_channels=c_out, temb_channels=temb, groups=4, eps=1e-6,
                       output_scale_factor=1.5),
    )
    assert (ours.conv_shortcut is None) == (c_in == c_out) and (ours.time_emb_proj is None) == (temb is None)
    x, e = torch.randn(2, c_in, 6, 5), (torch.randn(2, temb) if temb else None)
    with torch.no_grad():
        assert max_err(ours(x, e), theirs(x, e)) <= TOL


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_matches_diffusers(padding: int) -> None:
    ours, theirs = pair(L.Downsample2D(8, 12, padding=padding),
                        DDownsample2D(8, use_conv=True, out_channels=12, padding=padding, name="op"))
    for hw in [(8, 8), (7, 9)]:
        x = torch.randn(2, 8, *hw)
        with torch.no_grad():
            y = ours(x)
            expect = tuple((n + 1) // 2 if padding == 1 else n // 2 for n in hw)  # conv arithmetic
            assert tuple(y.shape[-2:]) == expect
            assert max_err(y, theirs(x)) <= TOL


def test_upsample_matches_diffusers() -> None:
    ours, theirs = pair(L.Upsample2D(8, 4), DUpsample2D(8, use_conv=True, out_channels=4))
    x = torch.randn(2, 8, 3, 5)
    with torch.no_grad():
        assert max_err(ours(x), theirs(x)) <= TOL
        assert max_err(ours(x, (7, 9)), theirs(x, output_size=(7, 9))) <= TOL
        assert ours(x, (7, 9)).shape == (2, 4, 7, 9)


def test_vae_mid_block_attention_matches_diffusers() -> None:
    c = 16
    ours, theirs = pair(
        L.Attention(c, heads=1, dim_head=c, norm_num_groups=4, eps=1e-6, bias=True, residual_connection=True),
        DAttention(c, heads=1, dim_head=c, norm_num_groups=4, eps=1e-6, bias=True, residual_connection=True,
                   upcast_softmax=True, _from_deprecated_attn_block=True),
    )
    assert set(ours.state_dict()) >= {"group_norm.weight", "to_q.bias", "to_out.0.weight"}
    x = torch.randn(2, c, 5, 4)
    with torch.no_grad():
        assert max_err(ours(x), theirs(x)) <= TOL


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_matches_diffusers(linear: bool) -> None:
    ours, theirs = pair(
        L.Transformer2DModel(4, 6, 24, num_layers=2, cross_attention_dim=10, norm_num_groups=4,
                             use_linear_projection=linear),
        DTransformer2DModel(4, 6, in_channels=24, num_layers=2, cross_attention_dim=10, norm_num_groups=4,
                            use_linear_projection=linear),
    )
    x, c = torch.randn(2, 24, 5, 3), torch.randn(2, 7, 10)
    with torch.no_grad():
        assert max_err(ours(x, c), theirs(x, encoder_hidden_states=c)) <= TOL


def test_attention_is_softmax_formula() -> None:
    """Invariant: multi-head SDPA equals softmax(QK^T/sqrt(d))V head by head (float64)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 12, generator=g, dtype=torch.float64) for n in (5, 7, 7))
    out = L.attention(q, k, v, heads=3)
    for h in range(3):
        s = slice(4 * h, 4 * h + 4)
        ref = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1) @ v[..., s]
        assert (out[..., s] - ref).abs().max() < 1e-12


def test_upcast_attention_computes_in_float32() -> None:
    """Invariant: with upcast, bf16 attention is exactly the fp32 attention of the same bf16 inputs, rounded once."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 16, generator=g).bfloat16() for n in (6, 9, 9))
    up = L.attention(q, k, v, heads=2, upcast=True)
    assert up.dtype == torch.bfloat16
    assert torch.equal(up, L.attention(q.float(), k.float(), v.float(), heads=2).bfloat16())


# ---------------------------------------------------------------- the U-Net


def make_pair(cfg: UNetConfig) -> tuple[UNet, UNet2DConditionModel]:
    theirs = UNet2DConditionModel.from_config(cfg.to_diffusers())
    ours = UNet(cfg)
    their_sd, our_sd = theirs.state_dict(), ours.state_dict()
    assert list(our_sd) == list(their_sd)  # same keys, same order
    assert all(our_sd[k].shape == their_sd[k].shape for k in our_sd)
    return pair(ours, theirs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers(name: str) -> None:
    cfg = CONFIGS[name]
    ours, theirs = make_pair(cfg)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([3, 700])
    for hw in [(12, 4), (7, 5)]:  # non-square; (7, 5): odd sizes take the exact-size upsampling path
        x = torch.randn(2, 4, *hw, generator=g)
        with torch.no_grad():
            y = ours(x, t, c)
            assert max_err(y, theirs(x, t, c)) <= TOL
    # the comparison is not vacuous: text and timestep both move the output by far more than the tolerance
    with torch.no_grad():
        assert (ours(x, t, c) - ours(x, t, torch.randn_like(c))).abs().max() > 100 * TOL
        assert (ours(x, t, c) - ours(x, t + 100, c)).abs().max() > 100 * TOL


def test_timestep_forms_agree() -> None:
    cfg = CONFIGS["sd1"]
    ours, theirs = make_pair(cfg)
    x, c = torch.randn(3, 4, 8, 8), torch.randn(3, 2, cfg.cross_attention_dim)
    with torch.no_grad():
        ref = ours(x, torch.tensor([250, 250, 250]), c)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor(250.0, dtype=torch.float64)):
            assert torch.equal(ours(x, t, c), ref)
        tf = torch.tensor([0.5, 10.25, 999.0])
        assert max_err(ours(x, tf, c), theirs(x, tf, c)) <= TOL


@pytest.mark.parametrize("name", ["sd1", "uneven"])
def test_gradient_checkpointing_gives_identical_gradients(name: str) -> None:
    cfg = dataclasses.replace(CONFIGS[name], dropout=0.1)
    model = randomize(UNet(cfg)).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 3, cfg.cross_attention_dim, generator=g, requires_grad=True)

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        c.grad = None
        torch.manual_seed(123)  # the same dropout masks; checkpoint replays the RNG state on recomputation
        model(x, torch.tensor([10, 500]), c).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()] + [c.grad.clone()]

    plain, ckpt = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert sum(a.abs().sum() for a in plain) > 0


def test_properties_and_bad_inputs() -> None:
    cfg = CONFIGS["sd1"]
    model = UNet(cfg)
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.double().dtype == torch.float64
    x, c = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 3, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\).*\(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64), 1, c)
    with pytest.raises(ValueError, match="width 16 != cross_attention_dim 24"):
        model(x, 1, torch.randn(2, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch 1 != sample batch 2"):
        model(x, 1, c[:1])
    with pytest.raises(ValueError, match=r"timestep must be a scalar or of shape \(2,\)"):
        model(x, torch.tensor([1, 2, 3]), c)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trip(name: str) -> None:
    cfg = CONFIGS[name]
    theirs = UNet2DConditionModel.from_config(cfg.to_diffusers())
    assert UNetConfig.from_diffusers(dict(theirs.config)) == cfg  # their full config (all keys) back to ours
    assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    assert UNetConfig.from_diffusers({**cfg.to_diffusers(), "sample_size": None}).sample_size == UNetConfig.sample_size


def test_num_attention_heads_alias() -> None:
    cfg = dataclasses.replace(CONFIGS["sd1"], attention_head_dim=99, num_attention_heads=4)
    assert cfg.heads == (4, 4) and cfg.to_diffusers()["attention_head_dim"] == 4
    assert list(UNet(cfg).state_dict()) == list(UNet(CONFIGS["sd1"]).state_dict())


@pytest.mark.parametrize("name", ["sd15", "sd2", "tiny"])
def test_yaml_configs_have_diffusers_shapes(name: str) -> None:
    """Every YAML config builds (on the meta device, no memory) a U-Net with diffusers' keys and shapes."""
    cfg = load_config(UNetConfig, CONFIG_DIR / f"unet-{name}.yaml")
    with torch.device("meta"):
        ours, theirs = UNet(cfg), UNet2DConditionModel.from_config(cfg.to_diffusers())
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    if name == "sd2":
        assert cfg.use_linear_projection and cfg.upcast_attention
        assert {c // h for c, h in zip(cfg.block_out_channels, cfg.heads)} == {64}


def test_config_errors_name_the_problem() -> None:
    base = CONFIGS["sd1"]
    with pytest.raises(ValueError, match="up_block_types has 3 entries but block_out_channels has 2"):
        dataclasses.replace(base, up_block_types=("UpBlock2D",) * 3)
    with pytest.raises(ValueError, match="unsupported block type"):
        dataclasses.replace(base, down_block_types=("AttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(ValueError, match="not divisible by the number of attention heads 5"):
        dataclasses.replace(base, attention_head_dim=5, norm_num_groups=1)
    with pytest.raises(ValueError, match="not divisible by norm_num_groups 12"):
        dataclasses.replace(base, norm_num_groups=12)
    with pytest.raises(ValueError, match="layers_per_block has 3 entries"):
        dataclasses.replace(base, layers_per_block=(1, 2, 3))
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNetConfig.from_diffusers({**base.to_diffusers(), "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="unknown diffusers UNet2DConditionModel config key 'bogus'"):
        UNetConfig.from_diffusers({**base.to_diffusers(), "bogus": 1})
    with pytest.raises(ConfigError, match="layers_per_block"):
        UNetConfig.from_diffusers({**base.to_diffusers(), "layers_per_block": "two"})
