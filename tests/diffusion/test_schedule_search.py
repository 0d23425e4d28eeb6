"""optimize_sigmas on the analytic 2-D mixture: the fitted schedule beats the default and Karras ones on new noise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedule import karras_sigmas, sd_schedule
from ldm.diffusion.schedule_search import optimize_sigmas, with_zero
from ldm.diffusion.toy import mixture_2d


@pytest.mark.parametrize("sampler,steps", [("dpmpp_2m", 6), ("euler", 6), ("unipc", 5)])
def test_fitted_schedule_beats_default_and_karras_on_held_out_noise(sampler, steps):
    """Fitted on 128 starts, scored on 1024 others: RMS distance of the final samples to the 500-step solution below
    95% of the better of SD's default (trailing) and Karras sigmas over the same range (measured: dpmpp_2m 0.092
    against 0.136 / 0.205, euler 0.157 against 0.174 / 0.248, unipc 0.083 against 0.155 / 0.239). Deterministic: a
    second fit gives the same sigmas (checked on a small one)."""
    gmm, schedule = mixture_2d(), replace(sd_schedule(), timestep_spacing="trailing")
    default = SAMPLERS[sampler].plan(schedule, steps).sigmas
    top, bottom = float(default[0]), float(schedule.sigmas()[0])
    fit = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * top
    held_out = torch.randn(1024, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * top
    fitted = optimize_sigmas(gmm, fit, steps, sampler, sigma_min=bottom, sigma_max=top, reference_steps=200)
    assert len(fitted) == steps + 1 and fitted[0] == top and fitted[-1] == 0 and (fitted[1:] < fitted[:-1]).all()
    assert fitted[-2] >= bottom
    reference = sample(gmm, held_out, with_zero(karras_sigmas(500, bottom, top)), sampler)

    def rms(sigmas: torch.Tensor) -> float:
        return (sample(gmm, held_out, sigmas, sampler) - reference).pow(2).mean().sqrt().item()

    baseline = min(rms(default), rms(with_zero(karras_sigmas(steps, bottom, top))))
    assert rms(fitted) < 0.95 * baseline, (rms(fitted), rms(default), rms(with_zero(karras_sigmas(steps, bottom, top))))
    again = optimize_sigmas(gmm, fit[:32], 3, sampler, sigma_min=bottom, sigma_max=top, reference_steps=50)
    assert torch.equal(again, optimize_sigmas(gmm, fit[:32], 3, sampler, sigma_min=bottom, sigma_max=top,
                                              reference_steps=50))


def test_bad_arguments_are_refused():
    gmm, x = mixture_2d(), torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        optimize_sigmas(gmm, x, 4, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="init must have 5 sigmas"):
        optimize_sigmas(gmm, x, 4, sigma_min=0.1, sigma_max=10.0, init=torch.tensor([10.0, 1.0, 0.0]))
