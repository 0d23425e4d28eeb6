"""DPM-Solver++ 2M SDE, 3M SDE and 2S ancestral: diffusers parity (same outputs and noise), identities, orders."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedule import karras_sigmas
from ldm.diffusion.toy import mixture_2d
from tests.diffusion._parity import SD, against_diffusers, order_slope
from tests.diffusion.test_samplers import _check_mixture

warnings.filterwarnings("ignore")
SDE = dict(algorithm_type="sde-dpmsolver++")
CASES = [  # (our sampler, its options, diffusers' DPMSolverMultistepScheduler options)
    ("dpmpp_2m_sde", {}, SDE),
    ("dpmpp_2m_sde", dict(solver_type="heun"), {**SDE, "solver_type": "heun"}),
    ("dpmpp_3m_sde", dict(diffusers_third_order=True), {**SDE, "solver_order": 3}),
]


@pytest.mark.parametrize("name,options,ref_kwargs", CASES)
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
@pytest.mark.parametrize("spacing,n", [("leading", 5), ("trailing", 12), ("linspace", 20)])
def test_equals_diffusers(name, options, ref_kwargs, sigma_schedule, spacing, n):
    """Same network, same seeded generator: one standard normal per step after the model call, as diffusers draws it
    (float32, which diffusers' DPM-Solver computes in, so the draws agree). Max abs difference <= 1e-4 on samples of
    size ~2: float32 rounding, amplified where a sample crosses between mixture modes at small sigma (measured
    <= 4.2e-5, most cases < 3e-6)."""
    assert (SAMPLERS[name].flavor, SAMPLERS[name].vp_output) == ("dpmsolver", True)
    ours, ref = against_diffusers(name, DPMSolverMultistepScheduler, {**SD, "timestep_spacing": spacing}, n,
                                  sigma_schedule=sigma_schedule, ref_kwargs=ref_kwargs, dtype=torch.float32,
                                  stochastic=True, **options)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_sde_with_eta_zero_is_dpmpp_2m_and_noise_matters():
    """eta = 0 turns the SDE solver into DPM-Solver++(2M) (float64 rounding); with eta = 1 the seed matters."""
    gmm, sigmas = mixture_2d(), torch.cat([karras_sigmas(12, 0.03, 14.6), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    torch.testing.assert_close(sample(gmm, x, sigmas, "dpmpp_2m_sde", eta=0.0), sample(gmm, x, sigmas, "dpmpp_2m"),
                               atol=1e-12, rtol=0)
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_ancestral"):
        a = sample(gmm, x, sigmas, name, generator=torch.Generator().manual_seed(1))
        b = sample(gmm, x, sigmas, name, generator=torch.Generator().manual_seed(2))
        assert (a - b).abs().max() > 1e-2, name


def test_sde_orders_and_diffusers_third_order_step():
    """The mean of the reverse SDE (s_noise = 0) on the linear test problem (tests/diffusion/_parity.py), 64..512
    steps: 2M SDE (midpoint and heun) and our 3M SDE converge with slope -2 (within 0.15; 3M's warm-up steps are of
    order 1 and 2, its third-order steps make the error over 3x smaller: measured 4.4x); diffusers' third-order
    coefficient (diffusers_third_order=True, c2 = -phi_3 - 1) converges with slope -1 (measured -1.05; 340x the error
    at 512 steps)."""
    slope_2m, errs_2m = order_slope("dpmpp_2m_sde", sde=True, s_noise=0.0)
    assert abs(slope_2m + 2) < 0.15, (slope_2m, errs_2m)
    slope, errs = order_slope("dpmpp_2m_sde", sde=True, s_noise=0.0, solver_type="heun")
    assert abs(slope + 2) < 0.15, (slope, errs)
    slope_3m, errs_3m = order_slope("dpmpp_3m_sde", sde=True, s_noise=0.0)
    assert abs(slope_3m + 2) < 0.15 and all(e3 < e2 / 3 for e3, e2 in zip(errs_3m, errs_2m)), (errs_3m, errs_2m)
    slope, errs = order_slope("dpmpp_3m_sde", sde=True, s_noise=0.0, diffusers_third_order=True)
    assert abs(slope + 1) < 0.15 and errs[-1] > 100 * errs_3m[-1], (slope, errs)


def test_2s_ancestral_with_eta_zero_is_deterministic_dpmpp_2s():
    """eta = 0: no noise, 2 NFE per step but the last (Euler to 0): 2n - 1; the result does not depend on the seed."""
    gmm, sigmas = mixture_2d(), torch.cat([karras_sigmas(8, 0.03, 14.6), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    calls = []
    counting = lambda y, s, **c: calls.append(1) or gmm(y, s)  # noqa: E731
    a = sample(counting, x, sigmas, "dpmpp_2s_ancestral", eta=0.0, generator=torch.Generator().manual_seed(1))
    assert len(calls) == 2 * 8 - 1
    b = sample(gmm, x, sigmas, "dpmpp_2s_ancestral", eta=0.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name,steps", [("dpmpp_2m_sde", 40), ("dpmpp_3m_sde", 40), ("dpmpp_2s_ancestral", 40)])
def test_sde_samplers_reproduce_the_2d_mixture(name, steps):
    """4000 samples: mode weights, mean and per-mode spread of the true mixture (tests/diffusion/test_samplers.py)."""
    sigmas = torch.cat([karras_sigmas(steps, 0.002, 80.0), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    _check_mixture(mixture_2d(), sample(mixture_2d(), x, sigmas, name, generator=torch.Generator().manual_seed(2)))


def test_bad_solver_type_is_refused():
    with pytest.raises(ValueError, match="unknown solver_type 'euler'; valid: midpoint, heun"):
        sample(mixture_2d(), torch.zeros(2, 2), torch.tensor([3.0, 1.0, 0.0]), "dpmpp_2m_sde", solver_type="euler")
