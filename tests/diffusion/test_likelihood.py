"""ldm/diffusion/likelihood.py against the analytic log-density of ldm/diffusion/toy.py's Gaussian mixtures (float64, seeded)."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import parameterization as P
from ldm.diffusion.likelihood import bits_per_dim, elbo_log_likelihood, pf_ode_log_likelihood, vp_eps_model
from ldm.diffusion.toy import mixture_1d, mixture_2d

F64 = torch.float64
SIGMA_MIN, SIGMA_MAX = 1e-3, 1e4


def vp_alphas_cumprod(T: int) -> torch.Tensor:
    """alphā at t_i = i / T of the VP SDE with beta in [0.1, 20] (Song et al. 2021): one process, T steps."""
    t = torch.arange(1, T + 1, dtype=F64) / T
    return torch.exp(-(0.1 * t + 0.5 * 19.9 * t**2))


@pytest.mark.parametrize("mixture", [mixture_1d, mixture_2d], ids=["1d", "2d"])
def test_pf_ode_log_likelihood_equals_the_analytic_density_within_0_01_nats(mixture) -> None:
    g = mixture()
    x = torch.cat([g.sample(6, torch.Generator().manual_seed(0)), g.means[:1] + 3.0])  # plus one far-tail point
    r = pf_ode_log_likelihood(g, x, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, steps=120, divergence="exact")
    err = (r.log_prob - g.log_prob(x, SIGMA_MIN)).abs().max().item()
    assert err < 0.01, err
    torch.testing.assert_close(r.log_prob, r.prior_log_prob + r.delta)
    torch.testing.assert_close(r.bpd, -r.log_prob / (g.dim * math.log(2)))
    assert r.nfe == 480


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased_within_its_monte_carlo_error(probe: str) -> None:
    """200 independent probes per point (2-D, where z^T J z is not exact): mean within 4 standard errors of exact."""
    g, reps = mixture_2d(), 200
    x = g.sample(3, torch.Generator().manual_seed(1))
    kw = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, steps=20)
    exact = pf_ode_log_likelihood(g, x, divergence="exact", **kw).log_prob
    est = pf_ode_log_likelihood(g, x.repeat(reps, 1), divergence="hutchinson", probe=probe,
                                generator=torch.Generator().manual_seed(2), **kw).log_prob.reshape(reps, 3)
    se = est.std(0) / math.sqrt(reps)
    assert (se > 1e-3).all()  # the estimator is genuinely random here
    assert ((est.mean(0) - exact).abs() < 4 * se).all(), (est.mean(0) - exact, se)
    # more probes per call shrink the spread
    many = pf_ode_log_likelihood(g, x.repeat(50, 1), divergence="hutchinson", probe=probe, n_probes=8,
                                 generator=torch.Generator().manual_seed(3), **kw).log_prob.reshape(50, 3)
    assert (many.std(0) < est.std(0)).all()


def test_vp_eps_model_gives_the_vp_score() -> None:
    """eps(x_t, t) = -sqrt(1 - ab) grad log p_vp(x_t) with p_vp(x_t) = p_sigma(x_t / sqrt(ab)) / ab^(D/2)."""
    g, ac = mixture_2d(), vp_alphas_cumprod(50)
    t = torch.tensor([0, 10, 25, 49])
    x_t = g.sample(4, torch.Generator().manual_seed(4))
    ab = ac[t]
    eps = vp_eps_model(g, ac)(x_t, t)
    sigma = ((1 - ab) / ab).sqrt()
    score_vp = g.score(x_t / ab.sqrt()[:, None], sigma) / ab.sqrt()[:, None]
    torch.testing.assert_close(P.score_from_eps(eps, ab[:, None]), score_vp, rtol=1e-10, atol=1e-10)


def elbo_gaps(x: torch.Tensor, steps: list[int]) -> list[tuple[float, float]]:
    """Mean and standard error of log p(x) - ELBO(x) over the samples, per number of diffusion steps."""
    g, out = mixture_1d(), []
    lp = g.log_prob(x)
    for T in steps:
        r = elbo_log_likelihood(g, x, vp_alphas_cumprod(T), decoder="continuous", variance="fixed_large",
                                generator=torch.Generator().manual_seed(T))
        d = lp - r.log_prob
        out.append((d.mean().item(), d.std().item() / math.sqrt(len(d))))
    return out


def test_elbo_is_below_log_p_and_tightens_from_10_to_100_steps() -> None:
    """Optimal denoiser as an eps network: mean gap (measured 0.29 at T = 10, 0.03 at T = 100) >= -3 SE, decreasing."""
    x = mixture_1d().sample(10_000, torch.Generator().manual_seed(0))
    (g10, se10), (g100, se100) = elbo_gaps(x, [10, 100])
    assert g10 > -3 * se10 and g100 > -3 * se100
    assert g10 - g100 > 3 * math.hypot(se10, se100)


@pytest.mark.slow
def test_elbo_tightens_over_10_100_1000_steps() -> None:
    """50k samples (SE ~0.005 nats): measured gaps 0.29, 0.03, 0.007 nats; each >= -3 SE and strictly decreasing."""
    x = mixture_1d().sample(50_000, torch.Generator().manual_seed(0))
    gaps = elbo_gaps(x, [10, 100, 1000])
    for gap, se in gaps:
        assert gap > -3 * se
    for (a, sa), (b, sb) in zip(gaps, gaps[1:]):
        assert a - b > 2 * math.hypot(sa, sb), gaps


def test_elbo_with_the_discretized_decoder_bounds_the_8_bit_probability() -> None:
    """On 8-bit data the discretized ELBO is <= log P(bin) ~ log p(x) + log(2/255) per dim (same sign of bits)."""
    g = mixture_1d()
    x = (g.sample(5_000, torch.Generator().manual_seed(5)) / 4).clamp(-1, 1)
    x = torch.round((x + 1) * 127.5) / 127.5 - 1
    scaled = type(g)(g.weights, g.means / 4, g.stds / 4)  # the law of x / 4
    r = elbo_log_likelihood(scaled, x, vp_alphas_cumprod(100), decoder="discretized", variance="fixed_large",
                            generator=torch.Generator().manual_seed(6))
    log_bin = scaled.log_prob(x) + math.log(2 / 255)  # bins are narrow against the data's spread
    d = log_bin - r.log_prob
    assert d.mean().item() > -3 * d.std().item() / math.sqrt(len(d))
    torch.testing.assert_close(r.bpd, -r.log_prob / math.log(2))


def test_bits_per_dim_and_8_bit_offset() -> None:
    lp = torch.tensor([-3.0, 0.5], dtype=F64)
    torch.testing.assert_close(bits_per_dim(lp, 3), -lp / (3 * math.log(2)))
    # a density on [-1, 1] turned into bin probabilities of width 2/255: -log2(p * 2/255) per dim
    torch.testing.assert_close(bits_per_dim(lp, 1, data_bits=8), -(lp + math.log(2 / 255)) / math.log(2))


def test_bad_input_errors_name_the_problem() -> None:
    g, x = mixture_1d(), torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        pf_ode_log_likelihood(g, x, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="unknown divergence"):
        pf_ode_log_likelihood(g, x, divergence="skilling")
    with pytest.raises(ValueError, match="unknown probe"):
        pf_ode_log_likelihood(g, x, divergence="hutchinson", probe="uniform")
    with pytest.raises(ValueError, match="unknown decoder"):
        elbo_log_likelihood(g, x, vp_alphas_cumprod(5), decoder="logistic")
