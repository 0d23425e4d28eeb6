"""Schedules, timesteps and sigma tables equal diffusers' (atol 1e-6, rtol 1e-6: float32 sigmas up to ~4096)."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from ldm.config import ConfigError
from ldm.diffusion.schedule import (
    NoiseSchedule,
    alphas_cumprod_from_betas,
    alphas_cumprod_from_sigmas,
    betas_from_alphas_cumprod,
    default_spacing,
    inference_timesteps,
    karras_sigmas,
    sampler_sigmas,
    sd_schedule,
    shift_snr,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
    t_to_sigma,
)

warnings.filterwarnings("ignore")
BETAS = [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02)]
SPACINGS = ["leading", "trailing", "linspace"]
STEPS = [1, 7, 25, 50]


def _cfg(beta: tuple[str, float, float], zero_snr: bool, spacing: str, offset: int = 0) -> dict:
    name, b0, b1 = beta
    return dict(num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=name,
                rescale_betas_zero_snr=zero_snr, timestep_spacing=spacing, steps_offset=offset)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_betas_and_alphas_cumprod_equal_diffusers(beta, zero_snr):
    cfg = _cfg(beta, zero_snr, "leading")
    ref, ours = DDPMScheduler(**cfg), NoiseSchedule.from_diffusers(cfg)
    assert torch.equal(ours.betas(), ref.betas)  # same float32 arithmetic: bit-exact
    assert torch.equal(ours.alphas_cumprod(), ref.alphas_cumprod)
    if zero_snr:
        assert ours.alphas_cumprod()[-1] == 0 and ours.sigmas()[-1] == pytest.approx(4096.0, rel=1e-6)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_and_sigmas_equal_diffusers(beta, zero_snr, spacing):
    for n in STEPS:
        for offset in (0, 1):
            cfg = _cfg(beta, zero_snr, spacing, offset)
            sched = NoiseSchedule.from_diffusers(cfg)
            for ref_cls in (DDIMScheduler, DDPMScheduler):
                ref = ref_cls(**cfg)
                ref.set_timesteps(n)
                assert torch.equal(ref.timesteps.double(), inference_timesteps(1000, n, spacing, offset, "ddim"))
            for karras in (False, True):
                ref = EulerDiscreteScheduler(**cfg, use_karras_sigmas=karras)
                ref.set_timesteps(n)
                ours = sampler_sigmas(sched, n, "euler", karras=karras)
                _close(ours, ref.sigmas)
                # integer timesteps recovered exactly; Karras (fractional t) to 1e-4. diffusers' zero-SNR+Karras first
                # t (995.26 instead of 999) is a float32-log artefact we do not copy.
                if not (zero_snr and karras):
                    t = sigma_to_t(ours[:-1], sched.sigmas(), "log" if karras else "linear")
                    torch.testing.assert_close(t, ref.timesteps.double(), atol=1e-4 if karras else 0, rtol=0)
                ref = DPMSolverMultistepScheduler(**cfg, use_karras_sigmas=karras)
                ref.set_timesteps(n)
                ours = sampler_sigmas(sched, n, "dpmsolver", karras=karras)
                _close(ours, ref.sigmas)
                # diffusers truncates cosine+Karras t (we round); zero-SNR+Karras: the float32-log artefact above
                if karras and (beta[0] == "squaredcos_cap_v2" or zero_snr):
                    continue
                t = sigma_to_t(ours[:-1], sched.sigmas(), "log", quantize=karras)
                assert torch.equal(t, ref.timesteps.double())


def test_final_sigma_min_matches_set_alpha_to_one_false():
    cfg = _cfg(BETAS[1], False, "leading", 1)
    sched = NoiseSchedule.from_diffusers({**cfg, "set_alpha_to_one": False, "clip_sample": False, "_class_name": "X"})
    assert sched.final_sigma("ddim") == "sigma_min" and sched.final_sigma("euler") == "zero"
    ref = DDIMScheduler(**cfg, set_alpha_to_one=False)
    sig = sampler_sigmas(sched, 10, "ddim")
    assert sig[-1].item() == pytest.approx(sigmas_from_alphas_cumprod(ref.final_alpha_cumprod).item(), rel=1e-7)


# Stable Diffusion 1.5's scheduler_config.json: PNDM, set_alpha_to_one false, no timestep_spacing
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
        "steps_offset": 1, "trained_betas": None, "clip_sample": False}


@pytest.mark.parametrize("final_sigmas_type", [None, "sigma_min"])
def test_sd15_pndm_config_gives_each_flavor_its_diffusers_sigmas(final_sigmas_type):
    """DDIM ends at alphā_0 (set_alpha_to_one false) with "leading" t; Euler and DPM-Solver (from_config of the PNDM
    config) end at final_sigmas_type (default 0) with their own default "linspace" spacing; atol/rtol 1e-6."""
    cfg = SD15 if final_sigmas_type is None else {**SD15, "final_sigmas_type": final_sigmas_type}
    sched = NoiseSchedule.from_diffusers(cfg)
    pndm_config = PNDMScheduler.from_config(cfg).config
    for n in (10, 30):
        ddim = DDIMScheduler.from_config(pndm_config)
        ddim.set_timesteps(n)
        ours = sampler_sigmas(sched, n, "ddim")
        _close(ours[:-1], sched.sigmas()[ddim.timesteps])
        _close(ours[-1:], sigmas_from_alphas_cumprod(ddim.final_alpha_cumprod.reshape(1)))
        assert ours[-1] > 0.029  # sigma_min ~ 0.0292: DDIM stops short of sigma 0, as in diffusers
        for ref_cls, flavor in ((EulerDiscreteScheduler, "euler"), (DPMSolverMultistepScheduler, "dpmsolver")):
            ref = ref_cls.from_config(pndm_config)
            ref.set_timesteps(n)
            ours = sampler_sigmas(sched, n, flavor)
            _close(ours, ref.sigmas)
            assert (ours[-1] == 0) == (final_sigmas_type is None)


def test_final_sigma_and_spacing_per_flavor_and_legacy_key():
    sched = NoiseSchedule.from_diffusers({"set_alpha_to_one": False})
    assert sched.timestep_spacing is None and "timestep_spacing" not in sched.to_diffusers()
    assert NoiseSchedule.from_diffusers(sched.to_diffusers()) == sched
    assert (default_spacing("ddim"), default_spacing("euler"), default_spacing("dpmsolver")) == (
        "leading", "linspace", "linspace")
    assert sampler_sigmas(sched, 5, "euler", final_sigma="sigma_min")[-1] > 0  # an explicit argument wins
    legacy = NoiseSchedule.from_diffusers({"final_sigma": "sigma_min"})  # our configs before the two keys
    assert legacy.set_alpha_to_one is False and legacy.final_sigmas_type == "sigma_min"
    # keys a config leaves out stay unsaid (None: the scheduler class's default) and are not written back
    assert NoiseSchedule.from_diffusers({"final_sigma": "zero"}) == NoiseSchedule(timestep_spacing=None, clip_sample=None)
    assert "clip_sample" not in sched.to_diffusers() and NoiseSchedule().to_diffusers()["clip_sample"] is False


def test_diffusers_config_round_trip_and_bad_keys():
    sched = NoiseSchedule(beta_schedule="scaled_linear", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    again = NoiseSchedule.from_diffusers(sched.to_diffusers())
    assert again == sched
    with pytest.raises(ConfigError, match="beta_schedule"):
        NoiseSchedule.from_diffusers({"beta_schedule": "quadratic"})
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        NoiseSchedule.from_diffusers({"num_train_timesteps": "1000"})
    with pytest.raises(ValueError, match="num_steps"):
        inference_timesteps(1000, 0)
    with pytest.raises(ValueError, match="timestep_spacing"):
        inference_timesteps(1000, 10, "uniform")


def test_sigma_t_round_trip_and_inverses():
    table = NoiseSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).sigmas()
    t = torch.tensor([0.0, 0.25, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    for interp in ("log", "linear"):
        torch.testing.assert_close(sigma_to_t(t_to_sigma(t, table, interp), table, interp), t, atol=1e-9, rtol=0)
    ints = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sigma_to_t(table, table, "log"), ints) and torch.equal(sigma_to_t(table, table, "linear"), ints)
    ab = torch.rand(50, dtype=torch.float64) * 0.98 + 0.01
    torch.testing.assert_close(alphas_cumprod_from_sigmas(sigmas_from_alphas_cumprod(ab)), ab, atol=1e-14, rtol=0)


def test_karras_closed_form():
    s = karras_sigmas(5, 0.1, 10.0, rho=1.0)  # rho = 1: a straight line
    torch.testing.assert_close(s, torch.linspace(10.0, 0.1, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    s = karras_sigmas(8, 0.03, 14.6)
    assert s[0].item() == pytest.approx(14.6, rel=1e-12) and s[-1].item() == pytest.approx(0.03, rel=1e-12)
    assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_shift_snr_divides_snr_by_shift_squared_and_loads_in_diffusers(shift, zero_snr):
    base = replace(sd_schedule(), rescale_betas_zero_snr=zero_snr, prediction_type="v_prediction")
    shifted = shift_snr(base, shift)
    ab, ab2 = base.alphas_cumprod().double(), shifted.alphas_cumprod().double()
    snr, snr2 = ab / (1 - ab), ab2 / (1 - ab2)
    n = len(ab) - 1 if zero_snr else len(ab)  # zero terminal SNR stays exactly 0
    # float32 tables: at t = 0, 1 - alphā ~ 1e-3 carries ~1e-4 relative rounding
    torch.testing.assert_close(snr2[:n], snr[:n] / shift**2, rtol=5e-4, atol=0)
    if zero_snr:
        assert ab2[-1] == 0 and ab[-1] == 0
    assert shifted.prediction_type == "v_prediction" and not shifted.rescale_betas_zero_snr
    assert shifted.betas().min() > 0 and shifted.betas().max() <= 1
    ref = DDPMScheduler.from_config(shifted.to_diffusers())  # diffusers reads trained_betas: the same float32 table
    assert torch.equal(ref.alphas_cumprod, shifted.alphas_cumprod())
    assert NoiseSchedule.from_diffusers(shifted.to_diffusers()) == shifted


def test_shift_snr_identity_inverse_and_bad_shift():
    base = sd_schedule()
    assert shift_snr(base, 1.0) is base
    ab = base.alphas_cumprod().double()
    torch.testing.assert_close(alphas_cumprod_from_betas(betas_from_alphas_cumprod(ab)), ab, rtol=1e-12, atol=0)
    for bad in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="shift"):
            shift_snr(base, bad)
