"""Sigma schedules: exponential, SGM-uniform (trailing) and Align Your Steps against diffusers; how a call picks one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import AysSchedules

from ldm.diffusion.samplers import SAMPLERS, sample
from ldm.diffusion.schedule import NoiseSchedule, sd_schedule, sigma_to_t
from ldm.diffusion.sigma_schedules import (
    AYS_SIGMAS,
    SIGMA_SCHEDULES,
    ays_sigmas,
    loglinear_interp,
    resolve_sigma_schedule,
    sigma_lookup,
)
from ldm.diffusion.toy import mixture_2d, vp_eps_net
from tests.diffusion._parity import SD

warnings.filterwarnings("ignore")
SCHEDULERS = [("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler),
              ("unipc", UniPCMultistepScheduler), ("lms", LMSDiscreteScheduler)]


def _timesteps(plan) -> torch.Tensor:
    """The timesteps the plan's denoiser feeds the network."""
    interpolation, quantize = sigma_lookup(plan.sigma_schedule, plan.flavor)
    return sigma_to_t(plan.sigmas[:-1], plan.schedule.sigmas(), interpolation, quantize)


@pytest.mark.parametrize("name,ref_cls", SCHEDULERS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_exponential_sigmas_and_timesteps_equal_diffusers(name, ref_cls, spacing, n):
    """use_exponential_sigmas: the same sigmas (diffusers' are float32: rtol 1e-6) between the ends diffusers uses for
    the scheduler (the whole table for DPM-Solver and UniPC, the spaced timesteps for Euler and LMS), and the same
    network timesteps: truncated to integers for DPM-Solver and UniPC (their int64 timesteps; exact), fractional
    log-interpolated for Euler and LMS (atol 1e-4, their float32)."""
    cfg = {**SD, "timestep_spacing": spacing}
    ref = ref_cls(**cfg, use_exponential_sigmas=True)
    ref.set_timesteps(n)
    plan = SAMPLERS[name].plan(NoiseSchedule.from_diffusers(cfg), n, sigma_schedule="exponential")
    torch.testing.assert_close(plan.sigmas, ref.sigmas.double(), rtol=1e-6, atol=0)
    exact = name in ("dpmpp_2m", "unipc")
    torch.testing.assert_close(_timesteps(plan), ref.timesteps.double(), atol=0 if exact else 1e-4, rtol=0)


@pytest.mark.parametrize("name,ref_cls", [*SCHEDULERS, ("ddim", DDIMScheduler)])
@pytest.mark.parametrize("n", [7, 10, 30])
def test_sgm_uniform_is_trailing_spacing(name, ref_cls, n):
    """"sgm_uniform" on a "leading" config samples as the scheduler with timestep_spacing="trailing": the same
    sigmas and, for DDIM, the same landing points t - T//n (its step_to)."""
    plan = SAMPLERS[name].plan(NoiseSchedule.from_diffusers(SD), n, sigma_schedule="sgm_uniform")
    ref = ref_cls(**{**SD, "timestep_spacing": "trailing"}, **({"set_alpha_to_one": True} if name == "ddim" else {}))
    ref.set_timesteps(n)
    trailing = NoiseSchedule.from_diffusers({**SD, "timestep_spacing": "trailing"})
    assert plan.sigmas.tolist() == SAMPLERS[name].plan(trailing, n).sigmas.tolist()
    torch.testing.assert_close(_timesteps(plan), ref.timesteps.double(), atol=0, rtol=0)
    assert plan.schedule.timestep_spacing == "trailing" and plan.ve_prior == (SAMPLERS[name].flavor == "euler")
    assert ("step_to" in plan.options) == (name == "ddim" and 1000 % n != 0)


@pytest.mark.parametrize("n", [10, 12, 25])
def test_sgm_uniform_is_within_a_timestep_of_comfyui_and_sgm(n):
    """ComfyUI's / A1111's "sgm_uniform" walks fractional t = 999 (1 - k/n) (log-interpolated sigma), Stability's
    generative-models (LegacyDDPMDiscretization) floor(999 (1 - k/n)); trailing's round(1000 (1 - k/n)) - 1 is within
    1.5 timesteps of the first and 1 of the second, and equal to SGM's for n = 10 (and 20, 25, 40, 50, 100, ...)."""
    plan = SAMPLERS["euler"].plan(sd_schedule(), n, sigma_schedule="sgm_uniform")
    ours = _timesteps(plan).numpy()
    comfy = 999 * (1 - np.arange(n) / n)
    sgm = np.floor(np.linspace(999, 0, n, endpoint=False))
    assert np.abs(ours - comfy).max() <= 1.5 and np.abs(ours - sgm).max() <= 1
    if n == 10:
        assert ours.tolist() == sgm.tolist()


@pytest.mark.parametrize("ours_name,theirs", [("ays_sd15", "StableDiffusion"), ("ays_sdxl", "StableDiffusionXL")])
def test_ays_is_the_published_schedule(ours_name, theirs):
    """10 steps: diffusers' AysSchedules sigmas (the paper's, ending at 0; float32: rtol 1e-7); their timesteps are the
    SD table's at ours to within one step (the published sigmas have 3 decimals); other step counts interpolate log
    sigma linearly between the knots (20 steps keep every knot at the even positions), end at 0 and decrease."""
    torch.testing.assert_close(ays_sigmas(ours_name, 10), torch.tensor(AysSchedules[f"{theirs}Sigmas"],
                                                                      dtype=torch.float64), rtol=1e-7, atol=0)
    t = sigma_to_t(ays_sigmas(ours_name, 10)[:-1], sd_schedule().sigmas(), "log")
    assert (t - torch.tensor(AysSchedules[f"{theirs}Timesteps"], dtype=torch.float64)).abs().max() < 1
    twenty = ays_sigmas(ours_name, 20)
    torch.testing.assert_close(twenty[:-1:2], torch.tensor(AYS_SIGMAS[ours_name][:-1], dtype=torch.float64),
                               rtol=1e-12, atol=0)
    assert twenty[-1] == 0 and (twenty[1:] < twenty[:-1]).all() and len(ays_sigmas(ours_name, 7)) == 8
    torch.testing.assert_close(loglinear_interp([8.0, 2.0], 3), torch.tensor([8.0, 4.0, 2.0], dtype=torch.float64))


def test_ays_euler_equals_diffusers_with_custom_sigmas():
    """EulerDiscreteScheduler.set_timesteps(sigmas=AysSchedules[...]) (diffusers' documented AYS use): the network sees
    log-interpolated fractional t; the same final samples (float64, atol 1e-5; measured 3.3e-7)."""
    sched, gmm, name = sd_schedule(), mixture_2d(), "euler"
    plan = SAMPLERS[name].plan(sched, 10, sigma_schedule="ays_sd15")
    ref = EulerDiscreteScheduler(**SD)
    ref.set_timesteps(sigmas=AysSchedules["StableDiffusionSigmas"])
    table = sched.sigmas()
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = noise * plan.prior_scale
    assert plan.prior_scale == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    ref_net, y = vp_eps_net(gmm, table, "log"), x
    for t in ref.timesteps:
        y = ref.step(ref_net(ref.scale_model_input(y, t), t), t, y).prev_sample
    out = sample(plan.denoiser(vp_eps_net(gmm, table, "log")), x, plan.sigmas, name)
    torch.testing.assert_close(out, y, atol=1e-5, rtol=0)


def test_resolve_sigma_schedule():
    """sigma_schedule wins; karras_sigmas is its alias (a contradiction is an error); None reads the config's
    use_karras_sigmas / use_exponential_sigmas; unknown names list the valid ones."""
    plain = sd_schedule()
    assert resolve_sigma_schedule(plain) == "default"
    assert resolve_sigma_schedule(plain, karras=True) == "karras"
    assert resolve_sigma_schedule(plain, karras=False) == "default"
    assert resolve_sigma_schedule(plain, "ays_sdxl") == "ays_sdxl" == resolve_sigma_schedule(plain, "ays_sdxl", False)
    assert resolve_sigma_schedule(NoiseSchedule.from_diffusers({**SD, "use_exponential_sigmas": True})) == "exponential"
    karras_folder = NoiseSchedule.from_diffusers({**SD, "use_karras_sigmas": True})
    assert resolve_sigma_schedule(karras_folder) == "karras"
    assert resolve_sigma_schedule(karras_folder, karras=False) == "default"
    with pytest.raises(ValueError, match="karras_sigmas=True contradicts sigma_schedule='exponential'"):
        resolve_sigma_schedule(plain, "exponential", True)
    with pytest.raises(ValueError, match="unknown sigma schedule 'kares'; valid: default, karras, exponential"):
        SAMPLERS["euler"].plan(plain, 10, sigma_schedule="kares")
    assert SIGMA_SCHEDULES == ("default", "karras", "exponential", "sgm_uniform", "ays_sd15", "ays_sdxl")
    assert SAMPLERS["dpmpp_2m"].plan(plain, 10, karras=True).karras
