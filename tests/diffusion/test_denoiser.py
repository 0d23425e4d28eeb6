"""Denoiser wrappers: parameterizations, VP/VE/continuous scaling, CFG (one call, rescale = diffusers), guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from ldm.diffusion.denoiser import (
    CFGDenoiser,
    ClassifierGuidedDenoiser,
    ContinuousVPDenoiser,
    DiscreteVPDenoiser,
    VEDenoiser,
    eps_from_denoised,
)
from ldm.diffusion.parameterization import target
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.toy import GaussianMixture, mixture_2d
from ldm.diffusion.toy import vp_eps_net

TABLE = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).sigmas()


def _x_sigma(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sigma = TABLE[torch.randint(0, 1000, (n,), generator=g)]  # table sigmas: t is an exact integer
    return torch.randn(n, 2, generator=g, dtype=torch.float64) * 3, sigma


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_discrete_vp_wrapper_recovers_the_exact_denoiser(prediction):
    """A network returning the exact eps / v / x0 of the mixture in VP coordinates gives D exactly (1e-10)."""
    gmm = mixture_2d()
    eps_net = vp_eps_net(gmm, TABLE, "log")

    def net(x_vp, t):
        sigma = TABLE[t.round().long()].reshape(-1, 1)
        ab = 1 / (1 + sigma**2)
        eps = eps_net(x_vp, t)
        x0 = (x_vp - (1 - ab).sqrt() * eps) / ab.sqrt()
        return target(prediction, x0, eps, ab)

    x, sigma = _x_sigma()
    out = DiscreteVPDenoiser(net, TABLE, prediction)(x, sigma)
    torch.testing.assert_close(out, gmm.denoiser(x, sigma), atol=1e-10, rtol=0)


def test_discrete_vp_wrapper_passes_exact_integer_t_and_scaled_input():
    seen = {}

    def net(x_vp, t, **cond):
        seen.update(x_vp=x_vp, t=t, cond=cond)
        return torch.zeros_like(x_vp)

    x, sigma = _x_sigma()
    DiscreteVPDenoiser(net, TABLE)(x, sigma, context="c")
    assert torch.equal(seen["t"].double(), torch.searchsorted(TABLE, sigma).double())
    torch.testing.assert_close(seen["x_vp"], x / (1 + sigma[:, None] ** 2).sqrt(), atol=1e-14, rtol=0)
    assert seen["cond"] == {"context": "c"}


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "score"])
def test_ve_wrapper(prediction):
    gmm = mixture_2d()
    x, sigma = _x_sigma()
    exact = {"epsilon": lambda y, s: (y - gmm.denoiser(y, s)) / s[:, None], "sample": gmm.denoiser,
             "score": gmm.score}[prediction]
    torch.testing.assert_close(VEDenoiser(exact, prediction)(x, sigma), gmm.denoiser(x, sigma), atol=1e-10, rtol=0)


def test_continuous_vp_wrapper_round_trip_and_exactness():
    gmm = mixture_2d()
    wrapper = ContinuousVPDenoiser(lambda x_vp, t: None)
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(wrapper.sigma_to_t(wrapper.t_to_sigma(t)), t, atol=1e-12, rtol=0)
    # alphā(t) = exp(-int_0^t beta) (Song et al. 2021, eq. 33), checked by quadrature of beta(s)
    s = torch.linspace(0, 0.7, 100_001, dtype=torch.float64)
    integral = torch.trapezoid(0.1 + s * 19.9, s)
    assert (1 / (1 + wrapper.t_to_sigma(torch.tensor(0.7, dtype=torch.float64)) ** 2)).item() == pytest.approx(
        torch.exp(-integral).item(), rel=1e-9)

    def net(x_vp, t):  # exact eps from the continuous t
        sig = wrapper.t_to_sigma(t).reshape(-1, 1)
        x = x_vp * (1 + sig**2).sqrt()
        return (x - gmm.denoiser(x, sig.reshape(-1))) / sig

    wrapper.net = net
    x, sigma = _x_sigma()
    torch.testing.assert_close(wrapper(x, sigma), gmm.denoiser(x, sigma), atol=1e-9, rtol=0)


class _Counting:
    """A conditional denoiser D(x, sigma, y): the mixture shifted by y; counts calls and batch sizes."""

    def __init__(self):
        self.gmm, self.batches = mixture_2d(), []

    def __call__(self, x, sigma, y):
        self.batches.append(len(x))
        return self.gmm.denoiser(x, sigma) + y * torch.tanh(x)


def _cfg_inputs():
    x, sigma = _x_sigma(8)
    g = torch.Generator().manual_seed(7)
    return x, sigma, {"y": torch.randn(8, 2, generator=g, dtype=torch.float64)}, {"y": torch.zeros(8, 2, dtype=torch.float64)}


def test_cfg_scales_one_and_zero_and_single_call():
    x, sigma, cond, uncond = _cfg_inputs()
    inner = _Counting()
    d_c, d_u = inner(x, sigma, **cond), inner(x, sigma, **uncond)
    inner.batches.clear()
    torch.testing.assert_close(CFGDenoiser(inner, 1.0)(x, sigma, cond=cond, uncond=uncond), d_c, atol=1e-12, rtol=0)
    torch.testing.assert_close(CFGDenoiser(inner, 0.0)(x, sigma, cond=cond, uncond=uncond), d_u, atol=1e-12, rtol=0)
    assert inner.batches == [16, 16]  # one batched call per evaluation
    out = CFGDenoiser(inner, 7.5)(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(out, d_u + 7.5 * (d_c - d_u), atol=1e-10, rtol=0)  # linear in D as well as in eps


def test_cfg_rescale_matches_diffusers():
    x, sigma, cond, uncond = _cfg_inputs()
    inner = _Counting()
    eps_c, eps_u = eps_from_denoised(x, sigma, inner(x, sigma, **cond)), eps_from_denoised(x, sigma, inner(x, sigma, **uncond))
    for phi in (0.3, 0.7, 1.0):
        ref_eps = rescale_noise_cfg(eps_u + 5.0 * (eps_c - eps_u), eps_c, guidance_rescale=phi)
        out = CFGDenoiser(inner, 5.0, rescale=phi)(x, sigma, cond=cond, uncond=uncond)
        torch.testing.assert_close(eps_from_denoised(x, sigma, out), ref_eps, atol=1e-10, rtol=0)


def test_cfg_guidance_interval_guides_only_inside_it():
    x, sigma, cond, uncond = _cfg_inputs()
    inner = _Counting()
    d_c, d_u = inner(x, sigma, **cond), inner(x, sigma, **uncond)
    lo, hi = sigma.sort().values[[2, 5]].tolist()  # items 3..5 of 8 (by sigma) inside (lo, hi]
    inside = ((sigma > lo) & (sigma <= hi))[:, None]
    assert 0 < int(inside.sum()) < len(sigma)
    out = CFGDenoiser(inner, 4.0, interval=(lo, hi))(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(out, torch.where(inside, d_u + 4.0 * (d_c - d_u), d_c), atol=1e-10, rtol=0)
    inner.batches.clear()
    below = float(sigma.min()) / 2
    out = CFGDenoiser(inner, 4.0, interval=(0.0, below))(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(out, d_c, atol=0, rtol=0)
    assert inner.batches == [8]  # no item inside: the unconditional branch is not run
    with pytest.raises(ValueError, match="guidance interval"):
        CFGDenoiser(inner, 4.0, interval=(2.0, 1.0))


def test_cfg_bad_inputs():
    x, sigma, cond, uncond = _cfg_inputs()
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(_Counting(), 2.0)(x, sigma, cond=cond, uncond={})
    with pytest.raises(ValueError, match="rescale"):
        CFGDenoiser(_Counting(), 2.0, rescale=1.5)


def test_classifier_guidance_gives_the_posterior_score():
    """Gaussian prior N(0, s0^2) and likelihood y | x0 ~ N(x0, r^2): at noise sigma, p(y | x) = N(y; a x, v) with
    a = s0^2/(s0^2+sigma^2), v = r^2 + s0^2 sigma^2/(s0^2+sigma^2); p(x | y) is Gaussian with a closed-form score.
    D_guided (scale 1) must equal x + sigma^2 grad log p(x | y) (1e-10)."""
    s0, r = 1.3, 0.4
    prior = GaussianMixture([1.0], [[0.0]], [s0])
    y = torch.tensor([0.8], dtype=torch.float64)

    def log_lik(x, sigma):
        a = s0**2 / (s0**2 + sigma**2)
        v = r**2 + s0**2 * sigma**2 / (s0**2 + sigma**2)
        return -0.5 * (y - a * x[:, 0]) ** 2 / v - 0.5 * torch.log(v)

    x, sigma = _x_sigma(12)
    x = x[:, :1]
    guided = ClassifierGuidedDenoiser(prior, log_lik, scale=1.0)(x, sigma)
    # posterior of x given y: joint Gaussian (x0, x, y); x | y ~ N(m, c) with
    var_x, cov_xy, var_y = s0**2 + sigma**2, s0**2, s0**2 + r**2
    m = cov_xy / var_y * y
    c = var_x - cov_xy**2 / var_y
    score = -(x[:, 0] - m) / c
    torch.testing.assert_close(guided[:, 0], x[:, 0] + sigma**2 * score, atol=1e-10, rtol=0)
