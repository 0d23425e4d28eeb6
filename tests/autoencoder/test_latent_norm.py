"""Per-channel latent standardisation folded into the VAE: exact posterior map, unchanged decoder, diffusers loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoencoder.latent_norm import fold_latent_standardization, latent_channel_stats
from autoencoder.model import AutoencoderKL
from tests.autoencoder.test_vae import TINY, TINY_B, random_state_dict

diffusers = pytest.importorskip("diffusers")


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    vae = AutoencoderKL(TINY).eval()
    vae.load_state_dict(random_state_dict(vae, seed))
    return vae


def images(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_fold_maps_the_posterior_affinely_and_keeps_reconstructions() -> None:
    vae, x = tiny_vae(), images()
    mean, std = latent_channel_stats(vae, x, batch=5, generator=torch.Generator().manual_seed(0))
    assert (std - std.mean()).abs().max() > 1e-3 and mean.abs().max() > 1e-3  # a fold that does something
    with torch.no_grad():
        before = vae.encode(x)
        z = torch.randn(before.mean.shape, generator=torch.Generator().manual_seed(2))
        dec_before = vae.decode(z * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1))
        fold_latent_standardization(vae, mean, std)
        after = vae.encode(x)
        dec_after = vae.decode(z)
    c = (1, -1, 1, 1)
    # q'(z' | x) = N((mu - m) / s, (sigma / s)^2): z' = (z - m) / s, channel by channel
    assert torch.allclose(after.mean, (before.mean - mean.view(c)) / std.view(c), atol=1e-5)
    assert torch.allclose(after.std, before.std / std.view(c), rtol=1e-5)
    assert torch.allclose(dec_after, dec_before, atol=1e-5)  # decode(z') = old decode(s z' + m)
    assert vae.config.scaling_factor == 1.0 and vae.config.shift_factor is None
    # the same posterior samples, standardised: zero mean and unit std per channel exactly
    m2, s2 = latent_channel_stats(vae, x, batch=5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(m2, torch.zeros(4), atol=1e-5) and torch.allclose(s2, torch.ones(4), atol=1e-5)


def test_folded_vae_loads_in_diffusers_with_the_same_outputs(tmp_path: Path) -> None:
    vae, x = tiny_vae(3), images(6)
    fold_latent_standardization(vae, torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([0.4, 1.3, 2.0, 0.9]))
    vae.save_pretrained(tmp_path / "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    assert ref.config.scaling_factor == 1.0
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (vae.encode(x).mean - ref.encode(x).latent_dist.mean).abs().max() <= 1e-5
        assert (vae.decode(z) - ref.decode(z).sample).abs().max() <= 1e-5


def test_fold_errors_name_the_problem() -> None:
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        fold_latent_standardization(vae, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        fold_latent_standardization(vae, torch.zeros(4), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="quant_conv"):
        fold_latent_standardization(AutoencoderKL(TINY_B), torch.zeros(3), torch.ones(3))
