"""UniPC and LMS: diffusers parity (same network outputs), exact LMS weights, identities, convergence, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import LMSDiscreteScheduler, UniPCMultistepScheduler
from scipy.integrate import quad

from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.samplers_multistep import lms_coefficients
from ldm.diffusion.schedule import karras_sigmas
from ldm.diffusion.toy import mixture_2d
from tests.diffusion._parity import SD, against_diffusers, order_slope

warnings.filterwarnings("ignore")
CASES = [("unipc", UniPCMultistepScheduler, "dpmsolver", True), ("lms", LMSDiscreteScheduler, "euler", False)]


@pytest.mark.parametrize("name,ref_cls,flavor,vp", CASES)
@pytest.mark.parametrize("sigma_schedule", ["default", "karras", "exponential"])
@pytest.mark.parametrize("spacing,n", [("leading", 5), ("trailing", 12), ("linspace", 20)])
def test_equals_diffusers(name, ref_cls, flavor, vp, sigma_schedule, spacing, n):
    """diffusers' UniPCMultistepScheduler (solver_order 2, bh2, predict_x0, UniC on) and LMSDiscreteScheduler (order 4)
    in float64 on the same network: max abs difference <= 1e-5 on samples of size ~2 (measured <= 7.5e-7; diffusers
    keeps its sigmas in float32). UniPC with Karras sigmas feeds rounded t to the network, with exponential ones
    truncated t: the plan's denoiser does the same."""
    assert (SAMPLERS[name].flavor, SAMPLERS[name].vp_output) == (flavor, vp)  # the table's facts are diffusers'
    ours, ref = against_diffusers(name, ref_cls, {**SD, "timestep_spacing": spacing}, n, sigma_schedule=sigma_schedule)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ref_kwargs,options,final", [
    (dict(solver_order=3), dict(order=3), "zero"),
    (dict(solver_type="bh1"), dict(variant="bh1"), "sigma_min"),
    (dict(disable_corrector=[1, 4]), dict(disable_corrector=[1, 4]), "zero"),
])
def test_unipc_options_equal_diffusers(ref_kwargs, options, final):
    """UniPC-3, the B(h) = h variant and switching the corrector off after given steps, as diffusers: <= 1e-5.
    (diffusers' "bh1" returns NaN on a last step to sigma 0, B(h) = -h = -inf times a zero correction; ours lands on
    x0_hat there, so that case ends at sigma_min.)"""
    cfg = {**SD, "timestep_spacing": "trailing", "final_sigmas_type": final}
    ours, ref = against_diffusers("unipc", UniPCMultistepScheduler, cfg, 10, ref_kwargs=ref_kwargs, **options)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_unipc_predictor_alone_is_dpmpp_2m():
    """UniP-2 with B(h) = expm1(-h) is DPM-Solver++(2M) (rho = 1/2): without its corrector UniPC walks dpmpp_2m's
    path exactly (float64 rounding) on a schedule ending at 0; the corrector changes it."""
    gmm, sigmas = mixture_2d(), torch.cat([karras_sigmas(12, 0.03, 14.6), torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    predictor = sample(gmm, x, sigmas, "unipc", disable_corrector=range(12))
    torch.testing.assert_close(predictor, sample(gmm, x, sigmas, "dpmpp_2m"), atol=1e-12, rtol=0)
    assert (sample(gmm, x, sigmas, "unipc") - predictor).abs().max() > 1e-3


def test_lms_coefficients_are_the_integrated_lagrange_basis():
    """Equal to k-diffusion's / diffusers' scipy quadrature of the Lagrange basis (to 1e-10 of the step), exact
    integration of a cubic through the nodes, and sigmas of a zero-terminal-SNR schedule (4096) without cancellation."""
    for nodes, upper in [([14.6, 9.1, 5.3, 3.2], 1.9), ([0.9, 0.5], 0.2), ([3.0], 0.0), ([4096.0, 157.0, 80.0], 40.0)]:
        ours = lms_coefficients(nodes, upper)
        for j, node in enumerate(nodes):
            def basis(tau, j=j, node=node, nodes=nodes):
                return math.prod((tau - o) / (node - o) for k, o in enumerate(nodes) if k != j)
            ref = quad(basis, nodes[-1], upper, epsabs=1e-13, epsrel=1e-13)[0]
            assert ours[j] == pytest.approx(ref, rel=1e-10, abs=1e-10 * abs(upper - nodes[-1]))
    cubic = lambda t: 2 * t**3 - t**2 + 3 * t - 1  # noqa: E731
    nodes, upper = [7.0, 4.0, 2.5, 1.5], 0.7
    integral = sum(c * cubic(v) for c, v in zip(lms_coefficients(nodes, upper), nodes))
    assert integral == pytest.approx((upper**4 / 2 - upper**3 / 3 + 1.5 * upper**2 - upper)
                                     - (1.5**4 / 2 - 1.5**3 / 3 + 1.5 * 1.5**2 - 1.5), rel=1e-12)


def test_convergence_orders():
    """The linear test problem (tests/diffusion/_parity.py: x0_hat a smooth function of sigma alone, exact solution by
    quadrature), 64..512 steps even in log sigma: UniPC's log-log slope within 0.2 of -2 (its first and, under
    lower_order_final, last step are first order; measured -1.89) with errors under half DPM-Solver++(2M)'s
    (measured 3.1x to 3.9x smaller), LMS steeper than -2.6 (measured -2.85, warming up from order 1)."""
    slope, errs = order_slope("unipc", sde=False)
    assert abs(slope + 2) < 0.2, (slope, errs)
    _, errs_2m = order_slope("dpmpp_2m", sde=False)
    assert all(e < e2 / 2 for e, e2 in zip(errs, errs_2m)), (errs, errs_2m)
    slope, errs = order_slope("lms", sde=False)
    assert slope < -2.6, (slope, errs)


def test_bad_options_raise_clear_errors():
    gmm, x, sigmas = mixture_2d(), torch.zeros(2, 2, dtype=torch.float64), torch.tensor([3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="unknown UniPC variant 'bh3'"):
        sample(gmm, x, sigmas, "unipc", variant="bh3")
    for name in ("unipc", "lms"):
        with pytest.raises(ValueError, match="order must be >= 1"):
            sample(gmm, x, sigmas, name, order=0)
