"""ldm/diffusion/sde.py: VP/VE SDEs against their sigma-space map, and the reverse-SDE family, PC and annealed Langevin samplers
against the analytic 1-D Gaussian mixture of ldm/diffusion/toy.py (float64, seeded).

Marginal statistic: the Kolmogorov-Smirnov distance between N = 4000 samples and the mixture's analytic CDF. Its
critical value at level 0.001 is 1.95 / sqrt(N) = 0.031; samplers must stay below it (discretisation bias included).
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import process as Dm
from ldm.diffusion import samplers
from ldm.diffusion.sde import VESDE, VPSDE, reverse_sde_step, sample_langevin, sample_pc, sample_reverse_sde
from ldm.diffusion.toy import mixture_1d

F64 = torch.float64
N = 4000
KS_CRIT = 1.95 / math.sqrt(N)  # Kolmogorov-Smirnov, alpha = 0.001


def ks_distance(samples: torch.Tensor) -> float:
    """sup_x |F_N(x) - F(x)| against the 1-D test mixture's CDF."""
    g = mixture_1d()
    s = samples[:, 0].sort().values
    cdf = sum(w * torch.special.ndtr((s - m) / sd) for w, m, sd in zip(g.weights, g.means[:, 0], g.stds))
    i = torch.arange(1, len(s) + 1, dtype=F64)
    return torch.maximum(i / len(s) - cdf, cdf - (i - 1) / len(s)).max().item()


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    r = torch.linspace(0, 1, n, dtype=F64)
    s = (sigma_max ** (1 / rho) + r * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])


def start(sigmas: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    gen = torch.Generator().manual_seed(seed)
    return sigmas[0] * torch.randn(N, 1, generator=gen, dtype=F64), gen


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), VESDE(0.01, 50.0)], ids=["vp", "ve"])
def test_sde_marginals_match_the_sigma_space_map_and_an_euler_maruyama_simulation(sde: VPSDE | VESDE) -> None:
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=F64)
    x0 = torch.tensor([[1.5], [-0.5], [0.2], [2.0]], dtype=F64)
    mean, std = sde.marginal_mean_std(x0, t)
    scale, sigma = sde.scale(t), sde.sigma(t)
    # x_sde = scale(t) * (x0 + sigma(t) * eps): mean scale * x0, std scale * sigma
    torch.testing.assert_close(mean, scale[:, None] * x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std.reshape(-1), scale * sigma, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sde.t_from_sigma(sigma), t, rtol=1e-10, atol=1e-12)
    if isinstance(sde, VPSDE):
        torch.testing.assert_close(scale, 1 / torch.sqrt(1 + sigma**2), rtol=1e-12, atol=0)
    # the drift and diffusion, simulated from x0 = 1 over [0.05, t] starting at the marginal there (2000 EM steps),
    # reach the closed-form marginal: sample mean / std within 5 standard errors + the O(dt) bias budget
    n, steps, t0, t1 = 20_000, 2000, 0.05, 0.7
    gen = torch.Generator().manual_seed(0)
    m0, s0 = sde.marginal_mean_std(torch.ones(1, 1, dtype=F64), torch.tensor(t0, dtype=F64))
    x = m0 + s0 * torch.randn(n, 1, generator=gen, dtype=F64)
    dt = (t1 - t0) / steps
    for k in range(steps):
        tk = torch.tensor(t0 + k * dt, dtype=F64)
        x = x + sde.drift(x, tk) * dt + sde.diffusion(tk) * math.sqrt(dt) * torch.randn(n, 1, generator=gen, dtype=F64)
    m1, s1 = sde.marginal_mean_std(torch.ones(1, 1, dtype=F64), torch.tensor(t1, dtype=F64))
    assert abs(x.mean().item() - m1.item()) < 5 * s1.item() / math.sqrt(n) + 1e-3
    assert abs(x.std().item() / s1.item() - 1) < 5 / math.sqrt(2 * n) + 2e-3


def test_prior_sample_and_log_density() -> None:
    for sde, var in [(VPSDE(), 1.0), (VESDE(0.01, 50.0), 2500.0)]:
        z = sde.prior_sample((3, 2, 2), torch.Generator().manual_seed(0), dtype=F64)
        ref = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), math.sqrt(var)).log_prob(z).flatten(1).sum(1)
        torch.testing.assert_close(sde.prior_log_prob(z), ref, rtol=1e-12, atol=1e-10)
        big = sde.prior_sample((20_000, 1), torch.Generator().manual_seed(1), dtype=F64)
        assert abs(big.var().item() / var - 1) < 5 * math.sqrt(2 / 20_000)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_reverse_sde_step_preserves_the_marginal_of_point_mass_data_exactly(lam: float) -> None:
    """x ~ N(mu, sigma^2) and D = mu: x' = mu + a (x - mu) + b z must have variance a^2 sigma^2 + b^2 = sigma'^2."""
    mu, sigma, sigma_next = torch.tensor(0.3, dtype=F64), torch.tensor(2.0, dtype=F64), torch.tensor(0.7, dtype=F64)
    x, zero = torch.ones(1, dtype=F64) * (mu + sigma), torch.zeros(1, dtype=F64)
    a_sigma = reverse_sde_step(x, mu.expand(1), sigma, sigma_next, zero, lam) - mu  # response to x - mu = sigma
    b = reverse_sde_step(mu.expand(1), mu.expand(1), sigma, sigma_next, torch.ones(1, dtype=F64), lam) - mu
    assert (a_sigma**2 + b**2).item() == pytest.approx(sigma_next.item() ** 2, rel=1e-12)


def test_reverse_sde_is_the_ddim_step_at_lam_0_and_the_ddpm_posterior_at_lam_1() -> None:
    """lam = 0: the Euler/DDIM step of ldm.diffusion.samplers; lam = 1: q(x_{t-1} | x_t, x0 = D) of ldm.diffusion.process (Ho eq. 7)."""
    g = mixture_1d()
    sigmas = karras_sigmas(12)
    x, gen = start(sigmas)
    x = x[:50]
    torch.testing.assert_close(sample_reverse_sde(g, x, sigmas, lam=0.0), samplers.sample_euler(g, x, sigmas))
    sigma, sigma_next = sigmas[3], sigmas[4]
    ab = 1 / (1 + torch.stack([sigma_next, sigma]) ** 2)  # alphā at (t - 1, t) for the VP view x_vp = x sqrt(ab)
    d = g(x[:5], sigma.expand(5))
    mean, var, _ = Dm.q_posterior(d, x[:5] * ab[1].sqrt(), torch.tensor([1] * 5), ab)
    mean_step = reverse_sde_step(x[:5], d, sigma, sigma_next, torch.zeros_like(d), 1.0)
    torch.testing.assert_close(mean_step, mean / ab[0].sqrt(), rtol=1e-12, atol=1e-12)
    b = reverse_sde_step(d, d, sigma, sigma_next, torch.ones_like(d), 1.0) - d
    torch.testing.assert_close(b**2, var / ab[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_reverse_sde_family_samples_the_mixture_at_every_noise_level(lam: float) -> None:
    """Same marginal for every lam. The first-order error grows with 1 + lam^2, so lam = 2 gets 400 steps, not 200
    (measured KS: 0.018, 0.008, 0.011 at lam = 0, 0.5, 1 and 0.012 at lam = 2; 0.029 at lam = 2 with 200 steps)."""
    sigmas = karras_sigmas(400 if lam > 1 else 200)
    x, gen = start(sigmas)
    out = sample_reverse_sde(mixture_1d(), x, sigmas, lam=lam, generator=gen)
    assert ks_distance(out) < KS_CRIT


def test_a_wrong_drift_is_detected_by_the_marginal_statistic() -> None:
    """Halving the score (drift (1 + lam^2)/4 instead of /2, the lam = 1 noise kept) must fail the same check."""
    g = mixture_1d()
    sigmas = karras_sigmas(200)
    x, gen = start(sigmas)
    out = sample_reverse_sde(lambda y, s: y + 0.5 * (g(y, s) - y), x, sigmas, lam=1.0, generator=gen)
    assert ks_distance(out) > 3 * KS_CRIT


@pytest.mark.parametrize("predictor", ["euler", "reverse_sde"])
def test_predictor_corrector_samples_the_mixture(predictor: str) -> None:
    sigmas = karras_sigmas(50)
    x, gen = start(sigmas)
    out = samplers.sample(mixture_1d(), x, sigmas, sampler="pc", predictor=predictor, corrector_steps=1, snr=0.16,
                          generator=gen)
    assert ks_distance(out) < KS_CRIT


def test_annealed_langevin_samples_the_mixture() -> None:
    """30 geometric levels 20 -> 0.01, 20 steps each, eps = 1e-4 (a_i / sigma_i^2 = 1), then a denoising step."""
    levels = torch.exp(torch.linspace(math.log(20.0), math.log(0.01), 30, dtype=F64))
    sigmas = torch.cat([levels, levels.new_zeros(1)])
    x, gen = start(sigmas)
    seen = []
    out = samplers.sample(mixture_1d(), x, sigmas, sampler="langevin", steps_per_level=20, step_size=1e-4,
                          generator=gen, callback=lambda i, s, y, d: seen.append(i))
    assert seen == list(range(30))
    assert ks_distance(out) < KS_CRIT
    # the same dynamics without annealing (one level at the data scale) cannot cross between the modes in time
    x, gen = start(sigmas)
    stuck = sample_langevin(mixture_1d(), x, sigmas[-2:], steps_per_level=100, step_size=1e-4, generator=gen)
    assert ks_distance(stuck) > 3 * KS_CRIT


def test_samplers_follow_the_seed_and_report_every_step() -> None:
    sigmas = karras_sigmas(10)
    x, _ = start(sigmas)
    runs = [sample_pc(mixture_1d(), x[:8], sigmas, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    seen: list[int] = []
    sample_reverse_sde(mixture_1d(), x[:8], sigmas, lam=0.5, generator=torch.Generator().manual_seed(5),
                       callback=lambda i, s, y, d: seen.append(i))
    assert seen == list(range(10))


def test_bad_input_errors_name_the_problem() -> None:
    g, x = mixture_1d(), torch.zeros(2, 1, dtype=F64)
    good = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        sample_reverse_sde(g, x, good, lam=-0.5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_reverse_sde(g, x, torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_langevin(g, x, torch.tensor([0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="unknown predictor"):
        sample_pc(g, x, good, predictor="heun")
    with pytest.raises(ValueError, match="snr > 0"):
        sample_pc(g, x, good, snr=0.0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_pc(g, x, torch.tensor([1.0, 0.0, -1.0], dtype=F64))
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(20.0, 0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(0.0, 50.0)
