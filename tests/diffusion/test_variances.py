"""Learned variances (Nichol & Dhariwal 2021): eq. 15's end points, L_t against the closed-form Gaussian KL, a perfect
variance head's bound on the analytic mixture, and the importance sampler of L_vlb."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.diffusion import process as Dm
from ldm.diffusion.losses import hybrid_loss, vlb_term
from ldm.diffusion.process import betas_from_alphas_cumprod, posterior_variances
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.toy import mixture_2d
from ldm.diffusion.variances import (
    LossSecondMomentSampler,
    VarianceHead,
    check_variance_channels,
    learned_range_log_variance,
    split_variance,
    step_log_variance,
)

F64 = torch.float64
AC = NoiseSchedule(num_train_timesteps=50, beta_start=0.002, beta_end=0.3).alphas_cumprod().double()


def test_learned_range_end_points_are_beta_tilde_and_beta() -> None:
    """v = -1 (frac 0) gives the clipped log beta~_t, v = +1 (frac 1) log beta_t, in p_mean_variance (1e-12)."""
    t = torch.arange(50)
    x = torch.randn(50, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn_like(x)
    _, log_small = posterior_variances(AC)
    log_large = betas_from_alphas_cumprod(AC).log()
    for v, want in ((-1.0, log_small), (1.0, log_large)):
        out = torch.cat([eps, torch.full_like(x, v)], dim=1)
        p = Dm.p_mean_variance(out, x, t, AC, variance="learned_range")
        torch.testing.assert_close(p.log_variance, want[:, None].expand_as(x), rtol=0, atol=1e-12)
        fixed = Dm.p_mean_variance(eps, x, t, AC, variance="fixed_small")
        torch.testing.assert_close(p.mean, fixed.mean, rtol=0, atol=0)  # the head does not touch the mean
    mid = learned_range_log_variance(torch.zeros(()), torch.tensor(-4.0), torch.tensor(-2.0))
    assert mid.item() == -3.0  # frac 1/2: the geometric mean


def test_step_log_variance_end_points_are_the_ddpm_small_and_large_variances() -> None:
    """In sigma space the sampler's learned step variance at v = -1 / +1 is sample_ddpm's "small" / "large" (1e-12)."""
    sig, nxt = 3.0, 1.2
    small = nxt**2 * (sig**2 - nxt**2) / sig**2
    large = (sig**2 - nxt**2) * (1 + nxt**2) / (1 + sig**2)
    for v, want in ((-1.0, small), (1.0, large)):
        head = VarianceHead("learned_range", torch.full((1, 2), v, dtype=F64), torch.ones(1))
        assert step_log_variance(head, sig, nxt).exp()[0].tolist() == pytest.approx([want, want], rel=1e-12)
    head = VarianceHead("learned", torch.full((1, 1), 0.25, dtype=F64), torch.ones(1))  # diffusers: the VP variance
    assert step_log_variance(head, sig, nxt).exp().item() == pytest.approx(0.25 * (1 + nxt**2), rel=1e-12)


def test_vlb_term_is_the_closed_form_gaussian_kl() -> None:
    """L_t (t > 0) equals KL(N(mu~, beta~) || N(mu_theta, Sigma_theta)) from torch.distributions, averaged over
    dimensions in bits; at t = 0 the continuous decoder's -log N(x0; mu, Sigma) (1e-10)."""
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(6, 4, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64)
    out = torch.cat([torch.randn(6, 4, generator=g, dtype=F64), torch.rand(6, 4, generator=g, dtype=F64) * 2 - 1], 1)
    t = torch.tensor([0, 1, 5, 17, 30, 49])
    got = vlb_term(out, x0, x_t, t, AC, variance="learned_range")
    ab, ab_prev = AC[t][:, None], torch.cat([torch.ones(1, dtype=F64), AC])[t][:, None]
    beta = 1 - ab / ab_prev
    x0_hat = (x_t - (1 - ab).sqrt() * out[:, :4]) / ab.sqrt()
    mean = lambda z: (ab_prev.sqrt() * beta * z + (1 - beta).sqrt() * (1 - ab_prev) * x_t) / (1 - ab)
    beta_tilde = (1 - ab_prev) / (1 - ab) * beta
    log_small = torch.where(t[:, None] == 0, posterior_variances(AC)[0][1], beta_tilde).log()  # beta~_1 := beta~_2
    frac = (out[:, 4:] + 1) / 2
    std = (0.5 * (frac * beta.log() + (1 - frac) * log_small)).exp()
    kl = kl_divergence(Normal(mean(x0), beta_tilde.clamp_min(1e-300).sqrt()), Normal(mean(x0_hat), std))
    nll = -Normal(mean(x0_hat), std).log_prob(x0)
    want = torch.where(t[:, None] == 0, nll, kl).mean(1) / math.log(2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _posterior_x0_variance(gmm, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Var[x0 | x0 + sigma eps = x] per dimension (averaged), exact for the mixture: the law of total variance over
    its components' Gaussian posteriors."""
    lp, _ = gmm._component_log_probs(x, torch.tensor(sigma, dtype=F64))
    r = torch.softmax(lp, dim=1)  # (N, K)
    s2 = gmm.stds[None, :] ** 2
    m = (s2[..., None] * x[:, None, :] + sigma**2 * gmm.means[None]) / (s2 + sigma**2)[..., None]  # (N, K, D)
    v = s2 * sigma**2 / (s2 + sigma**2)  # (N, K)
    mean = (r[..., None] * m).sum(1)
    second = (r * (v * gmm.dim + (m**2).sum(-1))).sum(1)
    return (second - (mean**2).sum(-1)) / gmm.dim


def test_a_perfect_variance_head_bounds_the_likelihood_at_least_as_tightly() -> None:
    """On the analytic 2-D mixture with its exact eps, the head giving the optimal Gaussian variance
    Sigma* = beta~_t + coef_x0^2 Var[x0 | x_t] (Bao et al. 2022, thm. 1) through eq. 15 gives a bound (bits/dim, the
    same noise draws) no looser than beta~_t or beta_t; the prior term is common to all three."""
    gmm = mixture_2d()
    sigmas = ((1 - AC) / AC).sqrt()
    _, log_small = posterior_variances(AC)
    log_large = betas_from_alphas_cumprod(AC).log()
    ab_prev = torch.cat([torch.ones(1, dtype=F64), AC[:-1]])
    coef_x0 = betas_from_alphas_cumprod(AC) * ab_prev.sqrt() / (1 - AC)

    def eps_net(x_t, t):
        sigma = float(sigmas[t[0]])
        x = x_t / AC[t[0]].sqrt()
        return (x - gmm.denoiser(x, sigma)) / sigma

    def perfect(x_t, t):
        i, x = int(t[0]), x_t / AC[t[0]].sqrt()
        optimal = posterior_variances(AC)[0][i] + coef_x0[i] ** 2 * _posterior_x0_variance(gmm, x, float(sigmas[i]))
        frac = (optimal.log() - log_small[i]) / (log_large[i] - log_small[i])
        return torch.cat([eps_net(x_t, t), (2 * frac - 1)[:, None].expand_as(x_t)], dim=1)

    x0 = gmm.sample(1000, torch.Generator().manual_seed(2))
    bound = {name: Dm.vlb_terms(fn, x0, AC, variance=v, decoder="continuous",
                                generator=torch.Generator().manual_seed(3)).bpd.mean().item()
             for name, fn, v in (("learned", perfect, "learned_range"), ("small", eps_net, "fixed_small"),
                                 ("large", eps_net, "fixed_large"))}
    assert bound["learned"] <= bound["small"] and bound["learned"] <= bound["large"], bound
    assert min(bound["small"], bound["large"]) - bound["learned"] > 0.01  # (1.16 vs 1.23 and 3.25): a real gap


def test_hybrid_loss_trains_only_the_variance_through_the_vlb_term() -> None:
    """L_hybrid = L_simple + lambda T L_t; the L_t part sends no gradient to the prediction channels (stop-gradient)."""
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 3, 20, 49])
    x_t = Dm.q_sample(x0, t, AC, noise)
    out = torch.randn(4, 6, generator=g, dtype=F64, requires_grad=True)
    loss, term = hybrid_loss(out, x0, noise, x_t, t, AC, lam=0.5)
    simple = (out[:, :3] - noise).pow(2).mean(1)
    torch.testing.assert_close(loss, simple + 0.5 * 50 * term, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad((loss - simple).sum(), out)
    assert grad[:, :3].abs().max() == 0 and grad[:, 3:].abs().max() > 0


def test_variance_channel_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="needs variance_type 'learned_range' or 'learned'"):
        check_variance_channels(4, 8, None)
    with pytest.raises(ValueError, match="must return 8 channels"):
        check_variance_channels(4, 4, "learned_range")
    with pytest.raises(ValueError, match="unknown variance_type 'learnt'"):
        check_variance_channels(4, 8, "learnt")
    with pytest.raises(ValueError, match="output of 8 channels"):
        split_variance(torch.zeros(1, 4), 4, "learned_range")
    check_variance_channels(4, 8, "learned_range")
    check_variance_channels(4, 4, "fixed_small")


def test_importance_sampler_is_uniform_until_warm_then_sqrt_second_moment_and_unbiased() -> None:
    sampler = LossSecondMomentSampler(4, history=3, uniform=0.1)
    gens = [torch.Generator().manual_seed(i) for i in range(5)]
    t, w = sampler.sample(gens)
    assert torch.equal(w, torch.ones(5, dtype=F64))  # uniform: weights 1
    losses = {0: [1.0, 2.0, 3.0, 4.0], 1: [0.5] * 3, 2: [2.0] * 3, 3: [0.0, 1.0, 1.0]}
    for k, values in losses.items():
        for value in values:
            assert not sampler.warmed_up()
            sampler.update(torch.tensor([k]), torch.tensor([value]))
    assert sampler.warmed_up()
    rms = torch.tensor([math.sqrt((4 + 9 + 16) / 3), 0.5, 2.0, math.sqrt(2 / 3)], dtype=F64)  # t = 0 kept 2, 3, 4
    p = sampler.probabilities()
    torch.testing.assert_close(p, 0.9 * rms / rms.sum() + 0.1 / 4, rtol=1e-12, atol=0)
    t, w = sampler.sample(gens)
    torch.testing.assert_close(w, 1 / (4 * p[t]))
    values = torch.tensor([3.0, 0.5, 2.0, 2 / 3], dtype=F64)
    assert (p * (1 / (4 * p)) * values).sum().item() == pytest.approx(values.mean().item(), rel=1e-12)  # unbiased
    other = LossSecondMomentSampler(4, history=3, uniform=0.1)
    other.load_state_dict(sampler.state_dict())
    assert torch.equal(other.history, sampler.history) and torch.equal(other.probabilities(), p)
    with pytest.raises(ValueError, match="does not fit"):
        LossSecondMomentSampler(5, history=3).load_state_dict(sampler.state_dict())
