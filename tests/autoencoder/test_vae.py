"""KL autoencoder: diffusers parity (same state dict), slicing/tiling, posterior math, losses, warm-up, errors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from autoencoder.distribution import DiagonalGaussian
from autoencoder.losses import (
    PatchDiscriminator,
    VAELoss,
    VAELossConfig,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    reconstruction_loss,
)
from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.config import ConfigError, load_config

diffusers = pytest.importorskip("diffusers")
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "ldm" / "configs"
TOL = 1e-5  # fp32 CPU parity with diffusers (max abs error)

TINY = load_config(VAEConfig, CONFIGS / "vae-tiny.yaml")  # f = 8, mid-block attention, quant convs
# A second, different shape: f = 4, 1 -> 2 channels, 3 latents, 2 layers per block, no attention, no quant convs.
TINY_B = VAEConfig(
    in_channels=1, out_channels=2, latent_channels=3, block_out_channels=(8, 16, 16), layers_per_block=2,
    norm_num_groups=8, sample_size=16, mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
)


def random_state_dict(model: torch.nn.Module, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """Seeded N(0, scale^2) weights (GroupNorm scales around 1) for every tensor of `model`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        w = torch.randn(v.shape, generator=g) * scale
        sd[k] = 1.0 + w if ("norm" in k and k.endswith("weight")) else w
    return sd


def pair(config: VAEConfig, seed: int = 0) -> tuple[AutoencoderKL, torch.nn.Module]:
    """Ours and diffusers' AutoencoderKL holding the same seeded weights (strict loads into both)."""
    ref = diffusers.AutoencoderKL.from_config(config.to_diffusers()).eval()
    ours = AutoencoderKL(config).eval()
    sd = random_state_dict(ref, seed)
    ref.load_state_dict(sd, strict=True)
    ours.load_state_dict(sd, strict=True)
    return ours, ref


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["tiny-f8-attn", "tiny-f4-noattn"])
def test_matches_diffusers(config: VAEConfig) -> None:
    ours, ref = pair(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    f = config.downsample_factor
    x = torch.randn(2, config.in_channels, 4 * f, 2 * f, generator=g)
    z = torch.randn(2, config.latent_channels, 4, 2, generator=g)
    with torch.no_grad():
        post, ref_post = ours.encode(x), ref.encode(x).latent_dist
        dec, ref_dec = ours.decode(z), ref.decode(z).sample
        fwd = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(2))
        ref_fwd = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(2)).sample
    assert post.mean.shape == (2, config.latent_channels, 4, 2)
    assert dec.shape == (2, config.out_channels, 4 * f, 2 * f)
    assert (post.mean - ref_post.mean).abs().max() <= TOL
    assert (post.std - ref_post.std).abs().max() <= TOL
    assert (dec - ref_dec).abs().max() <= TOL
    assert (fwd - ref_fwd).abs().max() <= TOL
    # non-degenerate outputs, so the comparisons above can fail
    assert post.mean.std() > 0.1 and dec.std() > 0.1 and (post.std - 1).abs().max() > 1e-3


def test_config_round_trip_and_sd_shape() -> None:
    ref = diffusers.AutoencoderKL.from_config(TINY_B.to_diffusers())
    assert VAEConfig.from_diffusers(dict(ref.config)) == TINY_B
    # keys missing from a diffusers config take diffusers' defaults
    default = diffusers.AutoencoderKL()
    assert VAEConfig.from_diffusers({}) == VAEConfig.from_diffusers(dict(default.config))
    # the SD VAE: identical key set and shapes (built on the meta device: no memory, no time)
    sd_cfg = load_config(VAEConfig, CONFIGS / "vae-sd.yaml")
    assert sd_cfg.downsample_factor == 8 and sd_cfg.scaling_factor == 0.18215
    with torch.device("meta"):
        ours, theirs = AutoencoderKL(sd_cfg), diffusers.AutoencoderKL.from_config(sd_cfg.to_diffusers())
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sum(v.numel() for v in ours.state_dict().values()) == sum(p.numel() for p in theirs.parameters())


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="DownEncoderBlock2D"):
        VAEConfig.from_diffusers({"down_block_types": ["AttnDownEncoderBlock2D"], "block_out_channels": [64]})
    with pytest.raises(ValueError, match="norm_type"):
        VAEConfig.from_diffusers({"norm_type": "spatial"})
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
    with pytest.raises(ConfigError, match="layers_per_blok"):
        from ldm.config import from_dict

        from_dict(VAEConfig, {"layers_per_blok": 1})


def test_sliced_equals_batched() -> None:
    """Float64: without attention, slicing is bit-exact; the attention's batched GEMMs differ at ~1e-15 (BLAS blocking)."""
    g = torch.Generator().manual_seed(3)
    for config, tol in ((dataclasses.replace(TINY, mid_block_add_attention=False), 0.0), (TINY, 1e-12)):
        model = AutoencoderKL(config).double().eval()
        z = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
        x = torch.randn(3, 3, 16, 8, generator=g, dtype=torch.float64)
        with torch.no_grad():
            batched, enc = model.decode(z), model.encode(x).parameters
            model.enable_slicing()
            sliced, enc_sliced = model.decode(z), model.encode(x).parameters
        assert (sliced - batched).abs().max() <= tol
        assert (enc_sliced - enc).abs().max() <= tol


def test_tiled_matches_diffusers() -> None:
    """Tiles of 16 px (2 latents at f = 8), 25% overlap; diffusers' same algorithm with the same tile settings."""
    ours, ref = pair(TINY, seed=4)
    ours.enable_tiling(tile_sample_size=32)
    ref.enable_tiling()  # diffusers tiles at config.sample_size = 32 px = 4 latents, overlap 0.25
    assert ref.tile_sample_min_size == ours.tile_sample_size == 32 and ref.tile_latent_min_size == 4
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 10, 7, generator=g)
    x = torch.randn(1, 3, 80, 56, generator=g)
    with torch.no_grad():
        tiled, ref_tiled = ours.decode(z), ref.decode(z).sample
        enc, ref_enc = ours.encode(x), ref.encode(x).latent_dist
        ours.disable_tiling()
        untiled = ours.decode(z)
    assert tiled.shape == untiled.shape == (1, 3, 80, 56)
    assert (tiled - ref_tiled).abs().max() <= TOL
    assert (enc.mean - ref_enc.mean).abs().max() <= TOL and (enc.std - ref_enc.std).abs().max() <= TOL
    assert (tiled - untiled).abs().max() > 1e-3  # tiling really happened (each tile sees only its own context)


def test_tiling_settings_error() -> None:
    model = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.enable_tiling(tile_sample_size=12)
    with pytest.raises(ValueError, match="does not tile evenly"):
        model.enable_tiling(tile_sample_size=40)


def test_bad_inputs_name_the_problem() -> None:
    model = AutoencoderKL(TINY)
    with pytest.raises(ValueError, match=r"multiples of 8.*30x32.*height 24 or 32"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="must have 3 channels, got 4"):
        model.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="must have 4 channels, got 3"):
        model.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="4-D"):
        model.decode(torch.zeros(4, 4, 4))


def test_gradient_checkpointing_same_gradients() -> None:
    model = AutoencoderKL(TINY_B).double()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    ckpt = grads()
    assert max((a - b).abs().max().item() for a, b in zip(plain, ckpt)) <= 1e-12


def test_latent_scaling_round_trip() -> None:
    model = AutoencoderKL(dataclasses.replace(TINY_B, scaling_factor=0.5, shift_factor=0.25))
    z = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(model.scale_latents(z), (z - 0.25) * 0.5)
    assert torch.allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-15)


# ----- posterior -----

def test_posterior_matches_diffusers_and_torch() -> None:
    g = torch.Generator().manual_seed(7)
    params = torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64)
    params[0, 2, 0, 0] = 50.0  # logvar above 20 is clamped
    ours, ref = DiagonalGaussian(params), DiagonalGaussianDistribution(params)
    assert ours.logvar.max() == 20.0
    torch.testing.assert_close(ours.kl(), ref.kl(), rtol=1e-12, atol=0)
    z = torch.randn(3, 2, 2, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours.nll(z), ref.nll(z), rtol=1e-12, atol=0)
    normal = torch.distributions.Normal(ours.mean, ours.std)
    torch.testing.assert_close(ours.nll(z), -normal.log_prob(z).sum((1, 2, 3)), rtol=1e-12, atol=1e-12)
    std_normal = torch.distributions.Normal(torch.zeros_like(ours.mean), torch.ones_like(ours.std))
    expected_kl = torch.distributions.kl_divergence(normal, std_normal).sum((1, 2, 3))
    torch.testing.assert_close(ours.kl(), expected_kl, rtol=1e-12, atol=1e-12)
    other = DiagonalGaussian(torch.randn(3, 4, 2, 3, generator=g, dtype=torch.float64))
    expected = torch.distributions.kl_divergence(normal, torch.distributions.Normal(other.mean, other.std))
    torch.testing.assert_close(ours.kl(other), expected.sum((1, 2, 3)), rtol=1e-12, atol=1e-12)
    # same generator -> same sample as diffusers; mode is the mean
    a = ours.sample(torch.Generator().manual_seed(8))
    b = ref.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and torch.equal(ours.mode(), ours.mean)


def test_kl_monte_carlo() -> None:
    """KL(q || N(0, I)) = E_q[log q(z) - log p(z)]: the MC mean over n = 20000 draws is within 5 standard errors."""
    g = torch.Generator().manual_seed(9)
    params = torch.cat([torch.randn(1, 2, 2, 2, generator=g), 0.5 * torch.randn(1, 2, 2, 2, generator=g)], 1)
    q = DiagonalGaussian(params.double().expand(20000, -1, -1, -1))
    z = q.sample(g)
    std_normal_nll = 0.5 * (math.log(2 * math.pi) + z.pow(2)).sum((1, 2, 3))
    log_ratio = std_normal_nll - q.nll(z)  # log q(z) - log p(z), one per draw
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(len(log_ratio))
    assert abs(mc - q.kl()[0]) < 5 * se, (mc.item(), q.kl()[0].item(), se.item())


def test_posterior_rejects_odd_channels() -> None:
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


# ----- losses -----

def test_loss_terms_by_hand() -> None:
    g = torch.Generator().manual_seed(10)
    x, x_rec = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    l1 = [sum(abs(a - b) for a, b in zip(x[i].flatten().tolist(), x_rec[i].flatten().tolist())) for i in range(2)]
    l2 = [sum((a - b) ** 2 for a, b in zip(x[i].flatten().tolist(), x_rec[i].flatten().tolist())) for i in range(2)]
    assert torch.allclose(reconstruction_loss(x, x_rec, "l1"), torch.tensor(l1, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(reconstruction_loss(x, x_rec, "l2"), torch.tensor(l2, dtype=torch.float64), atol=1e-12)
    # hinge: real logits (2, 0.5) -> relu(1 - .) = (0, 0.5); fake logits (-2, 0.5) -> relu(1 + .) = (0, 1.5)
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5) / 2 + (0 + 1.5) / 2))
    assert hinge_g_loss(fake).item() == pytest.approx(-(-2.0 + 0.5) / 2)
    # adaptive weight with linear losses in the last layer w: grad(rec) = a, grad(G) = b
    w = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    lam = adaptive_weight((w * a).sum(), (w * b).sum(), w)
    assert lam.item() == pytest.approx(a.norm().item() / (b.norm().item() + 1e-4), rel=1e-12)
    # total generator loss without discriminator = mean per-sample L1 + beta * mean KL
    post = DiagonalGaussian(torch.randn(2, 8, 2, 2, generator=g, dtype=torch.float64))
    loss_fn = VAELoss(VAELossConfig(kl_weight=0.1, use_discriminator=False))
    loss, logs = loss_fn.generator_loss(x, x_rec, post, step=10**6)
    assert loss.item() == pytest.approx(sum(l1) / 2 + 0.1 * post.kl().mean().item(), rel=1e-12)
    assert set(logs) == {"rec", "kl", "loss"}


def test_discriminator_only_after_warmup() -> None:
    torch.manual_seed(11)
    cfg = VAELossConfig(
        kl_weight=1e-3, disc_start=5, disc_weight=0.5, disc_in_channels=1, disc_num_layers=1, disc_channels=4
    )
    loss_fn = VAELoss(cfg).double().train()
    model = AutoencoderKL(TINY_B).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    disc = loss_fn.discriminator
    last = model.decoder.conv_out.weight

    post = model.encode(x)
    x_rec = model.decode(post.mode())[:, :1]
    before, logs = loss_fn.generator_loss(x, x_rec, post, step=4, last_layer=last)
    base = reconstruction_loss(x, x_rec).mean() + 1e-3 * post.kl().mean()
    assert before.item() == base.item() and "g" not in logs
    before.backward()
    assert all(p.grad is None for p in disc.parameters())  # D was not even called
    d_before, _ = loss_fn.discriminator_loss(x, x_rec, step=4)
    assert d_before.item() == 0.0

    post = model.encode(x)
    x_rec = model.decode(post.mode())[:, :1]
    after, logs = loss_fn.generator_loss(x, x_rec, post, step=5, last_layer=last)
    rec = reconstruction_loss(x, x_rec).mean()
    g = hinge_g_loss(disc(x_rec))
    lam = 0.5 * adaptive_weight(rec, g, last)
    expected = rec + 1e-3 * post.kl().mean() + lam * g
    assert lam.item() > 0 and after.item() == pytest.approx(expected.item(), rel=1e-10)
    d_after, _ = loss_fn.discriminator_loss(x, x_rec, step=5)
    assert d_after.item() == pytest.approx(hinge_d_loss(disc(x), disc(x_rec.detach())).item(), rel=1e-10)
    assert d_after.item() > 0


def test_discriminator_size_error() -> None:
    with pytest.raises(ValueError, match="at least 24x24"):
        PatchDiscriminator(3, 4, 3)(torch.zeros(1, 3, 16, 16))
