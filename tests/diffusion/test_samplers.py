"""Samplers: diffusers parity (same model outputs, same noise), mixture reproduction, convergence order, errors."""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)
from scipy import stats

from ldm.diffusion.denoiser import DiscreteVPDenoiser
from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedule import NoiseSchedule, karras_sigmas, sampler_sigmas
from ldm.diffusion.toy import mixture_1d, mixture_2d
from ldm.diffusion.toy import run_diffusers_scheduler, vp_eps_net

warnings.filterwarnings("ignore")
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          timestep_spacing="leading", steps_offset=1)
# (our sampler, its options, diffusers class, step kwargs, flavor, diffusers works in VP coordinates)
PARITY = [
    ("ddim", dict(eta=0.0), DDIMScheduler, dict(eta=0.0), "ddim", True),
    ("ddim", dict(eta=0.7), DDIMScheduler, dict(eta=0.7), "ddim", True),
    ("ddpm", {}, DDPMScheduler, {}, "ddim", True),
    ("euler", {}, EulerDiscreteScheduler, {}, "euler", False),
    ("euler_ancestral", {}, EulerAncestralDiscreteScheduler, {}, "euler", False),
    ("heun", {}, HeunDiscreteScheduler, {}, "euler", False),
    ("dpmpp_2m", {}, DPMSolverMultistepScheduler, {}, "dpmsolver", True),
]
STOCHASTIC = {"ddpm", "euler_ancestral"}


@pytest.mark.parametrize("name,opts,ref_cls,ref_kw,flavor,vp", PARITY)
@pytest.mark.parametrize("spacing,prediction,n", [("leading", "epsilon", 12), ("trailing", "epsilon", 10),
                                                  ("trailing", "epsilon", 30), ("linspace", "v", 12)])
def test_full_loop_equals_diffusers(name, opts, ref_cls, ref_kw, flavor, vp, spacing, prediction, n):
    """Max abs difference <= 1e-5 (diffusers keeps float32 alphā / casts Euler and DPM samples to float32)."""
    assert (SAMPLERS[name].flavor, SAMPLERS[name].vp_output) == (flavor, vp)  # the table's facts are diffusers'
    # DDIMScheduler steps from t to t - T//n and restarts at the next timestep (e.g. trailing, n = 30: 999 -> 966, then
    # 932 -> 899); the SAMPLERS entry's step_to says where each step lands, so these cases match too
    extra = dict(clip_sample=False) if ref_cls in (DDIMScheduler, DDPMScheduler) else {}
    cfg = {**SD, "timestep_spacing": spacing, **extra}
    sched = NoiseSchedule.from_diffusers(cfg)
    table, gmm = sched.sigmas(), mixture_2d()
    ref_sched = ref_cls(**cfg)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = sampler_sigmas(sched, n, flavor)
    x_start = noise * (1 + sigmas[0] ** 2).sqrt() if vp else noise * sigmas[0]  # the same state in sigma space
    stochastic = name in STOCHASTIC or opts.get("eta", 0) > 0
    gen = (lambda: torch.Generator().manual_seed(1)) if stochastic else (lambda: None)
    ref_net, our_net = vp_eps_net(gmm, table, "linear"), vp_eps_net(gmm, table, "linear")
    ref = run_diffusers_scheduler(ref_sched, ref_net, noise if vp else x_start, n, generator=gen(), **ref_kw)
    model = DiscreteVPDenoiser(our_net, table, "epsilon", interpolation="linear")
    out = sample(model, x_start, sigmas, name, generator=gen(), **opts, **SAMPLERS[name].schedule_options(sched, n))
    assert len(our_net.calls) == len(ref_net.calls)  # same NFE
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# Stable Diffusion 1.5's scheduler_config.json (PNDM, set_alpha_to_one false, no timestep_spacing)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}


@pytest.mark.parametrize("name,opts,ref_cls,ref_kw,flavor,vp", [p for p in PARITY if p[1].get("eta", 0) == 0])
def test_sd15_pndm_folder_config_equals_diffusers(name, opts, ref_cls, ref_kw, flavor, vp):
    """Each diffusers scheduler made with from_config of SD 1.5's PNDM config (as a pipeline switches schedulers):
    DDIM stops at alphā_0, the others at 0, each with its own default spacing. Max abs difference <= 1e-5. The sigmas
    and the output coordinates come from the SAMPLERS entry alone, as the pipeline takes them."""
    sched, gmm, n = NoiseSchedule.from_diffusers(SD15), mixture_2d(), 12
    table, spec = sched.sigmas(), SAMPLERS[name]
    ref_sched = ref_cls.from_config(PNDMScheduler.from_config(SD15).config)
    sigmas = spec.sigmas(sched, n)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_start = noise * (1 + sigmas[0] ** 2).sqrt() if vp else noise * sigmas[0]
    gen = (lambda: torch.Generator().manual_seed(1)) if name in STOCHASTIC else (lambda: None)
    ref_net, our_net = vp_eps_net(gmm, table, "linear"), vp_eps_net(gmm, table, "linear")
    ref = run_diffusers_scheduler(ref_sched, ref_net, noise if vp else x_start, n, generator=gen(), **ref_kw)
    model = DiscreteVPDenoiser(our_net, table, "epsilon", interpolation="linear")
    out = spec.to_output(sample(model, x_start, sigmas, name, generator=gen(), **opts), sigmas[-1].item())
    assert len(our_net.calls) == len(ref_net.calls)
    assert (sigmas[-1] > 0.029) == (name == "ddim")  # only DDIM stops short of sigma 0 (sigma_min ~ 0.0292)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_dpmpp_2m_karras_equals_diffusers_with_quantized_t():
    """diffusers' DPM-Solver++ with Karras sigmas feeds ROUNDED t to the network: DiscreteVPDenoiser(quantize=True)."""
    sched, gmm, n = NoiseSchedule.from_diffusers(SD), mixture_2d(), 15
    table = sched.sigmas()
    ref_sched = DPMSolverMultistepScheduler(**SD, use_karras_sigmas=True)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = run_diffusers_scheduler(ref_sched, vp_eps_net(gmm, table, "log"), noise, n)
    sigmas = sampler_sigmas(sched, n, "dpmsolver", karras=True)
    model = DiscreteVPDenoiser(vp_eps_net(gmm, table, "log"), table, quantize=True)
    out = sample(model, noise * (1 + sigmas[0] ** 2).sqrt(), sigmas, "dpmpp_2m")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_ddim_eta0_is_euler_and_ddpm_is_ancestral():
    """Identities in sigma space (see sample_ddim/sample_ddpm docstrings), to float64 rounding."""
    gmm = mixture_2d()
    sig = karras_sigmas(12, 0.01, 20.0)
    sig = torch.cat([sig, sig.new_zeros(1)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    torch.testing.assert_close(sample(gmm, x, sig, "ddim"), sample(gmm, x, sig, "euler"), atol=1e-12, rtol=0)
    a = sample(gmm, x, sig, "ddpm", generator=torch.Generator().manual_seed(5))
    b = sample(gmm, x, sig, "euler_ancestral", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _mixture_sigmas(name: str) -> torch.Tensor:
    """Karras sigmas 80 -> 0.002, then 0: 20 Heun steps (39 NFE), 40 ODE steps, 150 for the first-order SDE samplers
    (ancestral steps have a larger discretization bias, which the KS test detects at 40 steps)."""
    steps = {"heun": 20, "ddpm": 150, "euler_ancestral": 150}.get(name, 40)
    s = karras_sigmas(steps, 0.002, 80.0)
    return torch.cat([s, s.new_zeros(1)])


def _mode_stats(gmm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of samples in each mode (nearest mean) and the sample mean."""
    k = torch.cdist(x, gmm.means).argmin(1)
    return torch.bincount(k, minlength=len(gmm.weights)).double() / len(x), x.mean(0)


def _check_mixture(gmm, x: torch.Tensor) -> None:
    """Mode weights within 4.5 binomial s.d. (+0.01 for overlap/bias) and mean within 4.5 s.e. of the truth."""
    n = len(x)
    frac, mean = _mode_stats(gmm, x)
    tol_w = 4.5 * torch.sqrt(gmm.weights * (1 - gmm.weights) / n) + 0.01
    assert ((frac - gmm.weights).abs() <= tol_w).all(), (frac, gmm.weights)
    truth = gmm.sample(200_000, torch.Generator().manual_seed(99))
    tol_m = 4.5 * truth.std(0) / math.sqrt(n) + 0.01
    assert ((mean - truth.mean(0)).abs() <= tol_m).all(), (mean, truth.mean(0))
    within = torch.stack([(x[torch.cdist(x, gmm.means).argmin(1) == k] - gmm.means[k]).pow(2).mean()
                          for k in range(len(gmm.weights))])
    torch.testing.assert_close(within.sqrt(), gmm.stds, atol=0.04, rtol=0.1)  # per-mode std (s.e. ~ 1-2 %)


@pytest.mark.parametrize("name", sorted(SAMPLERS.keys() & {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m"}))
def test_samplers_reproduce_the_2d_mixture(name):
    gmm, n = mixture_2d(), 4000
    sig = _mixture_sigmas(name)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sig[0]
    _check_mixture(gmm, sample(gmm, x, sig, name, generator=torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "ddpm"])
def test_samplers_reproduce_the_1d_mixture_ks(name):
    """Kolmogorov-Smirnov against the exact mixture CDF, n = 3000: p > 1e-3."""
    gmm, n = mixture_1d(), 3000
    sig = _mixture_sigmas(name)
    x = torch.randn(n, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * sig[0]
    out = sample(gmm, x, sig, name, generator=torch.Generator().manual_seed(5))[:, 0].numpy()
    w, m, s = gmm.weights.numpy(), gmm.means[:, 0].numpy(), gmm.stds.numpy()
    cdf = lambda v: sum(wk * stats.norm.cdf(v, mk, sk) for wk, mk, sk in zip(w, m, s))  # noqa: E731
    assert stats.kstest(out, cdf).pvalue > 1e-3


def test_broken_samplers_fail_the_statistics():
    """The checks have power: a denoiser evaluated at 0.7 sigma, or ancestral steps without their noise, fail."""
    gmm, n = mixture_2d(), 4000
    sig = _mixture_sigmas("euler")
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sig[0]
    with pytest.raises(AssertionError):
        _check_mixture(gmm, sample(lambda y, s: gmm(y, 0.7 * s), x, sig, "euler"))
    with pytest.raises(AssertionError):
        _check_mixture(gmm, sample(gmm, x, sig, "euler_ancestral", s_noise=0.0))


@functools.cache
def _ode_reference() -> tuple[torch.Tensor, torch.Tensor]:
    gmm = mixture_1d()
    x = torch.randn(200, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10.0
    return x, sample(gmm, x, karras_sigmas(4000, 0.05, 10.0), "heun")


@pytest.mark.slow
@pytest.mark.parametrize("name,order", [("euler", 1.0), ("heun", 2.0), ("dpmpp_2m", 2.0)])
def test_convergence_order(name, order):
    """RMS error vs step count (64..512) against a 4000-step Heun solution of the same ODE from the same start,
    sigma 10 -> 0.05 (Karras rho = 7): fitted log-log slope within 0.15 of -order (measured: Euler -0.98, Heun -1.97,
    DPM-Solver++(2M) -1.93). Max-abs error is erratic for Euler (a start near the basin boundary), RMS is not."""
    gmm = mixture_1d()
    x, ref = _ode_reference()
    steps = [64, 128, 256, 512]
    errs = [(sample(gmm, x, karras_sigmas(k + 1, 0.05, 10.0), name) - ref).pow(2).mean().sqrt().item() for k in steps]
    slope = np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope + order) < 0.15, (slope, errs)


def test_bad_inputs_raise_clear_errors():
    gmm = mixture_1d()
    x = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*dpmpp_2m"):
        sample(gmm, x, torch.tensor([1.0, 0.0]), "eulr")
    for bad, msg in [(torch.tensor([[1.0, 0.0]]), "1-D"), (torch.tensor([1.0]), "at least 2"),
                     (torch.tensor([1.0, 2.0, 0.0]), "strictly decreasing"), (torch.tensor([1.0, float("nan")]), "NaN"),
                     (torch.tensor([1.0, -0.5]), ">= 0")]:
        with pytest.raises(ValueError, match=msg):
            sample(gmm, x, bad, "euler")

    def nan_at_third_call(y, s, _calls=[]):  # noqa: B006
        _calls.append(1)
        return y * float("nan") if len(_calls) == 3 else y * 0.5

    with pytest.raises(FloatingPointError, match="step 2"):
        sample(nan_at_third_call, x, torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0]), "dpmpp_2m")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_names_the_step_of_a_nan_output(name):
    x = torch.zeros(2, 1, dtype=torch.float64)
    nan_model = lambda y, s: y * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"step 0 \(sigma=3\)"):
        sample(nan_model, x, torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64), name)


def test_generator_list_and_callback():
    """One generator per item: an item's result does not depend on its batch; callback sees every step."""
    gmm = mixture_2d()
    sig = torch.cat([karras_sigmas(6, 0.01, 10.0), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 10
    seen = []
    full = sample(gmm, x, sig, "euler_ancestral", generator=[torch.Generator().manual_seed(i) for i in range(3)],
                  callback=lambda i, s, y, d: seen.append(i))
    one = sample(gmm, x[1:2], sig, "euler_ancestral", generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(full[1:2], one, atol=1e-12, rtol=0)
    assert seen == list(range(6))


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing", None])
def test_each_plan_starts_from_its_diffusers_schedulers_prior(spacing):
    """init_noise_sigma: sigma_max for the Euler family under linspace / trailing (None: Euler's default, linspace),
    sqrt(1 + sigma_max^2) otherwise and for DDIM, DDPM and DPM-Solver always."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    cfg = {**SD, "timestep_spacing": spacing} if spacing else {k: v for k, v in SD.items() if k != "timestep_spacing"}
    sched = NoiseSchedule.from_diffusers(cfg)
    for name, cls in (("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler), ("ddim", DDIMScheduler),
                      ("dpmpp_2m", DPMSolverMultistepScheduler)):
        ref = cls(**cfg)
        ref.set_timesteps(10)
        plan = SAMPLERS[name].plan(sched, 10)
        assert plan.prior_scale == pytest.approx(float(ref.init_noise_sigma) if name in ("euler", "heun") else
                                                 math.sqrt(1 + float(plan.sigmas[0]) ** 2), rel=1e-5), (name, spacing)
        if name in ("euler", "heun"):
            assert plan.ve_prior == (spacing in ("linspace", "trailing", None))
