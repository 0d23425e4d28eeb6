"""ldm/diffusion/process.py against closed forms, Bayes' rule by numerical integration, and invariants (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, stats

from ldm.diffusion import losses as DL
from ldm.diffusion import process as Dm
from ldm.diffusion import parameterization as P

F64 = torch.float64


def linear_alphas_cumprod(T: int = 50) -> torch.Tensor:
    """Ho et al.'s linear betas 1e-4 .. 0.02, rescaled to T steps."""
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=F64).clamp(max=0.5)
    return torch.cumprod(1 - betas, 0)


def test_forward_marginal_is_the_composition_of_one_step_kernels_and_matches_monte_carlo() -> None:
    ac = linear_alphas_cumprod()
    betas = Dm.betas_from_alphas_cumprod(ac)
    x0 = torch.tensor([[-1.0], [0.3], [2.0]], dtype=F64)
    # closed form: iterate q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) from a point mass
    mean, var = x0.clone(), torch.zeros_like(x0)
    for i in range(len(ac)):
        mean, var = (1 - betas[i]).sqrt() * mean, (1 - betas[i]) * var + betas[i]
        m, v, lv = Dm.q_mean_variance(x0, torch.full((3,), i), ac)
        torch.testing.assert_close(m, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, var, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lv, var.log(), rtol=1e-12, atol=1e-12)
    # Monte Carlo of q_sample: sample mean and variance within 5 standard errors (n = 200k per x0)
    n, t = 200_000, torch.full((3,), 20)
    g = torch.Generator().manual_seed(0)
    xs = Dm.q_sample(x0.repeat(1, n), t, ac, torch.randn(3, n, generator=g, dtype=F64))
    m, v, _ = Dm.q_mean_variance(x0, t, ac)
    assert ((xs.mean(1, keepdim=True) - m).abs() <= 5 * (v / n).sqrt()).all()
    assert ((xs.var(1, keepdim=True) - v).abs() <= 5 * v * math.sqrt(2 / n)).all()


@pytest.mark.parametrize("i", [1, 2, 17, 49])
def test_q_posterior_equals_bayes_rule_by_numerical_integration(i: int) -> None:
    ac = linear_alphas_cumprod()
    betas = Dm.betas_from_alphas_cumprod(ac)
    x0, x_t = torch.tensor([[0.7]], dtype=F64), torch.tensor([[-0.4]], dtype=F64)
    mean, var, log_var = Dm.q_posterior(x0, x_t, torch.tensor([i]), ac)
    # q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), integrated on a fine grid
    m_prev, v_prev = ac[i - 1].sqrt() * 0.7, 1 - ac[i - 1]
    lo, hi = float(m_prev - 12 * v_prev.sqrt()), float(m_prev + 12 * v_prev.sqrt())
    y = torch.linspace(lo, hi, 400_001, dtype=F64)
    logw = -0.5 * (-0.4 - (1 - betas[i]).sqrt() * y) ** 2 / betas[i] - 0.5 * (y - m_prev) ** 2 / v_prev
    w = torch.exp(logw - logw.max())
    z = torch.trapezoid(w, y)
    num_mean = torch.trapezoid(w * y, y) / z
    num_var = torch.trapezoid(w * (y - num_mean) ** 2, y) / z
    torch.testing.assert_close(mean.squeeze(), num_mean, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(var.squeeze(), num_var, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(log_var.squeeze(), num_var.log(), rtol=1e-6, atol=1e-6)


def test_q_posterior_at_the_first_step_is_the_data_with_clipped_log_variance() -> None:
    ac = linear_alphas_cumprod()
    x0, x_t = torch.tensor([[0.7]], dtype=F64), torch.tensor([[-0.4]], dtype=F64)
    mean, var, log_var = Dm.q_posterior(x0, x_t, torch.tensor([0]), ac)
    assert mean.item() == pytest.approx(0.7, abs=1e-12) and var.item() == 0
    _, var1, _ = Dm.q_posterior(x0, x_t, torch.tensor([1]), ac)
    assert log_var.item() == pytest.approx(math.log(var1.item()), rel=1e-12)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_p_mean_variance_is_the_posterior_at_the_true_x0_for_every_parameterization(prediction: str) -> None:
    ac = linear_alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 5, 30, 49])
    x_t = Dm.q_sample(x0, t, ac, eps)
    ab = ac[t][:, None]
    output = P.target(prediction, x0, eps, ab)
    p = Dm.p_mean_variance(output, x_t, t, ac, prediction=prediction, variance="fixed_small")
    q_mean, q_var, q_log_var = Dm.q_posterior(x0, x_t, t, ac)
    torch.testing.assert_close(p.pred_x0, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.mean, q_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.variance, q_var)
    torch.testing.assert_close(p.log_variance, q_log_var)
    large = Dm.p_mean_variance(output, x_t, t, ac, prediction=prediction, variance="fixed_large")
    torch.testing.assert_close(large.variance, Dm.betas_from_alphas_cumprod(ac)[t][:, None].expand(4, 3))
    # round trip through every other parameterization
    for other in P.PREDICTIONS:
        back = P.target(other, p.pred_x0, P.to_eps(prediction, x_t, output, ab), ab)
        torch.testing.assert_close(back, P.target(other, x0, eps, ab), rtol=1e-9, atol=1e-9)


def test_min_snr_weights_follow_the_formula_and_make_the_three_objectives_equal() -> None:
    ac = linear_alphas_cumprod(1000)
    t = torch.tensor([0, 10, 100, 300, 999])
    s = Dm.snr(t, ac)
    torch.testing.assert_close(s, ac[t] / (1 - ac[t]))
    gamma = 5.0
    expect = {"sample": torch.minimum(s, torch.full_like(s, gamma))}
    expect["epsilon"] = expect["sample"] / s
    expect["v_prediction"] = expect["sample"] / (s + 1)
    for prediction, w in expect.items():
        torch.testing.assert_close(DL.min_snr_weight(s, gamma, prediction), w)
    assert (expect["epsilon"][s > gamma] < 1).all() and (expect["epsilon"][s <= gamma] == 1).all()
    # Hang et al.: the weights express one x0-space loss min(SNR, g) |x0 - x0_hat|^2 in every parameterization
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 2, 3, generator=g, dtype=F64), torch.randn(5, 2, 3, generator=g, dtype=F64)
    eps_hat = eps + 0.3 * torch.randn(5, 2, 3, generator=g, dtype=F64)
    ab = ac[t].reshape(-1, 1, 1)
    x_t = Dm.q_sample(x0, t, ac, eps)
    x0_hat = P.x0_from_eps(x_t, eps_hat, ab)
    outputs = {"epsilon": eps_hat, "sample": x0_hat, "v_prediction": P.v_from_x0_eps(x0_hat, eps_hat, ab)}
    losses = {
        k: DL.diffusion_loss(o, x0, eps, t, ac, prediction=k, weighting="min_snr", gamma=gamma)
        for k, o in outputs.items()
    }
    torch.testing.assert_close(losses["epsilon"], losses["sample"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses["v_prediction"], losses["sample"], rtol=1e-9, atol=1e-12)
    simple = DL.diffusion_loss(eps_hat, x0, eps, t, ac)
    torch.testing.assert_close(simple, (eps_hat - eps).pow(2).flatten(1).mean(1))


def test_normal_kl_matches_numerical_integration() -> None:
    m1, v1, m2, v2 = 0.3, 0.5, -0.8, 2.0
    p, q = stats.norm(m1, math.sqrt(v1)), stats.norm(m2, math.sqrt(v2))
    num, _ = integrate.quad(lambda y: p.pdf(y) * (p.logpdf(y) - q.logpdf(y)), -30, 30, epsabs=1e-13)
    kl = Dm.normal_kl(*(torch.tensor(v, dtype=F64) for v in (m1, math.log(v1), m2, math.log(v2))))
    assert kl.item() == pytest.approx(num, rel=1e-9)


def test_discretized_decoder_matches_bin_integrals_and_sums_to_one() -> None:
    levels = torch.linspace(-1, 1, 256, dtype=F64)
    mean, log_scale = torch.tensor(0.37, dtype=F64), torch.tensor(math.log(0.2), dtype=F64)
    logp = Dm.discretized_gaussian_log_likelihood(levels, mean, log_scale)
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-12)
    d = stats.norm(0.37, 0.2)
    for k in [0, 1, 100, 175, 254, 255]:
        lo = -math.inf if k == 0 else levels[k].item() - 1 / 255
        hi = math.inf if k == 255 else levels[k].item() + 1 / 255
        num, _ = integrate.quad(d.pdf, lo, hi, epsabs=0, epsrel=1e-12)
        assert logp[k].item() == pytest.approx(math.log(num), rel=1e-7, abs=1e-9), k
    # far tails stay finite and accurate
    far = Dm.discretized_gaussian_log_likelihood(levels[200:201], torch.tensor(-0.9, dtype=F64), log_scale)
    assert far.item() == pytest.approx(math.log(d.sf(levels[200].item() - 1 / 255 + 1.27)
                                                - d.sf(levels[200].item() + 1 / 255 + 1.27)), rel=1e-9)
    cont = Dm.continuous_gaussian_log_likelihood(levels, mean, log_scale)
    torch.testing.assert_close(cont, torch.from_numpy(d.logpdf(levels.numpy())), rtol=1e-12, atol=1e-12)


def test_vlb_of_an_oracle_is_prior_plus_decoder_and_bits_per_dim_are_nats_over_d_ln2() -> None:
    """A network that returns the true x0 makes every KL term 0 under fixed_small (the posterior is then exact)."""
    ac = linear_alphas_cumprod(20)
    x0 = torch.tensor([[-1.0, 0.2, 1.0], [0.5, -0.5, 0.0]], dtype=F64)
    vlb = Dm.vlb_terms(lambda x_t, t: x0, x0, ac, prediction="sample", generator=torch.Generator().manual_seed(0))
    assert vlb.terms.shape == (2, 20)
    assert vlb.terms[:, 1:].abs().max().item() < 1e-12
    prior = Dm.normal_kl(ac[-1].sqrt() * x0, (1 - ac[-1]).log(), torch.zeros(()), torch.zeros(())).sum(1)
    torch.testing.assert_close(vlb.prior, prior)
    # decoder N(x0; x0, beta~_2) (clipped log variance) on each 8-bit bin; the edge bins reach to -inf / +inf
    h = (1 / 255) / math.sqrt(Dm.posterior_variances(ac)[0][1].item())
    inner, edge = math.log(2 * stats.norm.cdf(h) - 1), math.log(stats.norm.cdf(h))
    expect = torch.tensor([-(2 * edge + inner), -3 * inner], dtype=F64)
    torch.testing.assert_close(vlb.terms[:, 0], expect, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vlb.bpd, vlb.nll / (3 * math.log(2)))
    torch.testing.assert_close(vlb.elbo, -(vlb.prior + vlb.terms.sum(1)))


def test_bad_input_errors_name_the_problem() -> None:
    ac = linear_alphas_cumprod(10)
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="strictly decreasing"):
        Dm.q_posterior(x, x, torch.tensor([1, 2]), ac.flip(0))
    with pytest.raises(ValueError, match=r"timestep indices must lie in \[0, 9\]"):
        Dm.q_sample(x, torch.tensor([0, 10]), ac, x)
    with pytest.raises(ValueError, match="unknown variance"):
        Dm.p_mean_variance(x, x, torch.tensor([1, 2]), ac, variance="learnt")
    with pytest.raises(ValueError, match="unknown prediction"):
        DL.min_snr_weight(torch.ones(2), 5.0, "score")
    with pytest.raises(ValueError, match="unknown loss weighting"):
        DL.diffusion_loss(x, x, x, torch.tensor([1, 2]), ac, weighting="p2")
    with pytest.raises(ValueError, match=r"data in \[-1, 1\]"):
        Dm.discretized_gaussian_log_likelihood(torch.full((2,), 1.5), torch.zeros(2), torch.zeros(2))


def test_min_snr_weight_is_finite_under_zero_terminal_snr() -> None:
    """Zero terminal SNR (Lin et al. 2024): SNR(T-1) = 0 exactly, where eps weight min(SNR, g)/SNR is 0/0; the weight
    there is its limit 1 (as diffusers' scripts set it), and every other step keeps the formula."""
    from ldm.diffusion.schedule import NoiseSchedule

    ac = NoiseSchedule(beta_schedule="scaled_linear", rescale_betas_zero_snr=True).alphas_cumprod().double()
    assert ac[-1] == 0
    t = torch.tensor([0, 500, 998, 999])
    s = Dm.snr(t, ac)
    assert s[-1] == 0 and (s[:-1] > 0).all()
    gamma = 5.0
    w = DL.min_snr_weight(s, gamma, "epsilon")
    assert torch.isfinite(w).all()
    assert w[-1] == 1
    torch.testing.assert_close(w[:-1], torch.clamp(s[:-1], max=gamma) / s[:-1], rtol=0, atol=0)
    # continuity: the limit SNR -> 0+ of the formula is the value used at 0 (|w(1e-12) - 1| = 0 in float64)
    assert DL.min_snr_weight(torch.tensor([1e-12], dtype=F64), gamma, "epsilon").item() == 1.0
    assert DL.min_snr_weight(s, gamma, "v_prediction")[-1] == 0 and DL.min_snr_weight(s, gamma, "sample")[-1] == 0
    # through the loss and its gradient
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    out = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    loss = DL.diffusion_loss(out, x0, eps, t, ac, prediction="epsilon", weighting="min_snr", gamma=gamma)
    torch.testing.assert_close(loss[-1], (out[-1] - eps[-1]).pow(2).mean(), rtol=0, atol=0)
    loss.sum().backward()
    assert torch.isfinite(out.grad).all()


def test_timestep_bias_weights_follow_the_strategy() -> None:
    """Ones, times the multiplier on exactly the biased block: the noisiest / least noisy portion, or [begin, end)."""
    T = 1000
    assert torch.equal(DL.timestep_bias_weights(T), torch.ones(T, dtype=torch.float64))
    later = DL.timestep_bias_weights(T, "later", 3.0, 0.5)
    assert torch.equal(later[:500], torch.ones(500, dtype=torch.float64)) and torch.all(later[500:] == 3.0)
    earlier = DL.timestep_bias_weights(T, "earlier", 2.0, 0.25)
    assert torch.all(earlier[:250] == 2.0) and torch.all(earlier[250:] == 1.0)
    band = DL.timestep_bias_weights(T, "range", 0.0, begin=200, end=300)
    assert band.sum() == T - 100 and torch.all(band[200:300] == 0) and band[199] == 1 and band[300] == 1
    assert torch.all(DL.timestep_bias_weights(T, "range", 5.0, begin=600)[600:] == 5.0)  # end None = T


def test_timestep_bias_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown timestep bias strategy 'late'"):
        DL.timestep_bias_weights(1000, "late", 2.0)
    with pytest.raises(ValueError, match=r"range \[900, 1200\) must lie within \[0, 1000\)"):
        DL.timestep_bias_weights(1000, "range", 2.0, begin=900, end=1200)
    with pytest.raises(ValueError, match="no timestep with positive weight"):
        DL.timestep_bias_weights(1000, "later", 0.0, portion=1.0)
    with pytest.raises(ValueError, match="portion must lie in"):
        DL.timestep_bias_weights(1000, "later", 2.0, portion=0.0)
    with pytest.raises(ValueError, match="biases none of them"):
        DL.timestep_bias_weights(1000, "later", 2.0, portion=0.0004)
    with pytest.raises(ValueError, match="finite and >= 0"):
        DL.timestep_bias_weights(1000, "later", float("inf"))
