"""DDPM sampling with a learned variance equals diffusers' DDPMScheduler (variance_type learned_range / learned) on the
same network outputs and generator, step by step in float64; with CFG it guides eps only and takes the conditional
branch's variance (DeepFloyd IF's pipeline loop, written out here as the reference)."""

import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion.denoiser import CFGDenoiser, DiscreteVPDenoiser
from ldm.diffusion.samplers import SAMPLERS, sample_ddpm
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.toy import mixture_2d, run_diffusers_scheduler, vp_eps_net

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          timestep_spacing="leading", clip_sample=False)


def learned_net(table: torch.Tensor, kind: str):
    """The mixture's exact eps and a smooth variance head of (x_vp, t): [eps; v], 2C channels (C = 2)."""
    eps_net = vp_eps_net(mixture_2d(), table)

    def net(x_vp, t, shift=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x_vp.shape[0])[:, None]
        eps = eps_net(x_vp, t[:, 0]) + (0 if shift is None else shift)
        v = 0.8 * torch.tanh(0.7 * x_vp + t / 500 - 1)  # in (-1, 1), varying over items, channels and steps
        if kind == "learned":  # diffusers reads it as the (VP) variance itself: keep it positive
            v = 0.02 * (v + 1.5)
        return torch.cat([eps, v.to(x_vp.dtype) + (0 if shift is None else 0.1 * shift)], dim=1)

    return net


@pytest.mark.parametrize("kind, steps_offset, steps", [("learned_range", 1, 10), ("learned_range", 0, 25),
                                                       ("learned", 1, 10)])
def test_learned_variance_ddpm_equals_diffusers_step_by_step(kind, steps_offset, steps) -> None:
    """32 points, the same start noise, network and seeded generator: ours equals DDPMScheduler within 1e-5 (float64
    samples; diffusers keeps alphā in float32, measured <= 1.6e-6, as the fixed-variance parity tests), the last step
    included (from t = 1 diffusers adds noise with beta~ clamped to 1e-20, from t = 0 none)."""
    cfg = {**SD, "steps_offset": steps_offset, "variance_type": kind}
    schedule = NoiseSchedule.from_diffusers(cfg)
    assert schedule.variance_type == kind
    spec = SAMPLERS["ddpm"]
    plan = spec.plan(schedule, steps)
    net = learned_net(plan.schedule.sigmas(), kind)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = run_diffusers_scheduler(DDPMScheduler(**cfg), net, noise, steps, generator=torch.Generator().manual_seed(1))
    seen = []
    out = spec(plan.denoiser(net), noise * plan.prior_scale, plan.sigmas, generator=torch.Generator().manual_seed(1),
               callback=lambda i, s, x, d: seen.append(x.clone()), **plan.options)
    got = spec.to_output(out, float(plan.sigmas[-1]))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    fixed = sample_ddpm(plan.denoiser(net), noise * plan.prior_scale, plan.sigmas, variance="small",
                        generator=torch.Generator().manual_seed(1), **plan.options)
    assert (fixed - got).abs().max() > 1e-2  # the head changes the result, so the comparison can fail


def test_cfg_guides_eps_only_and_takes_the_conditional_variance() -> None:
    """CFGDenoiser around a learned-variance denoiser = IF's loop with DDPMScheduler: eps_u + s (eps_c - eps_u) and
    the conditional branch's variance head (1e-5: diffusers' float32 alphā; measured 2e-7)."""
    cfg, steps, scale = {**SD, "steps_offset": 1, "variance_type": "learned_range"}, 10, 4.0
    spec = SAMPLERS["ddpm"]
    plan = spec.plan(NoiseSchedule.from_diffusers(cfg), steps)
    net = learned_net(plan.schedule.sigmas(), "learned_range")
    cond, uncond = torch.full((32, 2), 0.3, dtype=torch.float64), torch.zeros(32, 2, dtype=torch.float64)
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler, sample, gen = DDPMScheduler(**cfg), noise.clone(), torch.Generator().manual_seed(1)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        eps_u, _ = net(sample, t, uncond).split(2, dim=1)
        eps_c, v_c = net(sample, t, cond).split(2, dim=1)
        guided = torch.cat([eps_u + scale * (eps_c - eps_u), v_c], dim=1)
        sample = scheduler.step(guided, t, sample, generator=gen).prev_sample
    model = CFGDenoiser(plan.denoiser(net), scale)
    out = spec(model, noise * plan.prior_scale, plan.sigmas, generator=torch.Generator().manual_seed(1),
               cond={"cond": {"shift": cond}, "uncond": {"shift": uncond}}, **plan.options)
    torch.testing.assert_close(spec.to_output(out, float(plan.sigmas[-1])), sample, rtol=0, atol=1e-5)


def test_other_samplers_use_the_prediction_and_errors_name_the_problem() -> None:
    """Euler on a learned-variance network is Euler on its eps part; variance='learned' without a head is refused."""
    schedule = NoiseSchedule.from_diffusers({**SD, "steps_offset": 1, "variance_type": "learned_range"})
    plan = SAMPLERS["euler"].plan(schedule, 8)
    net = learned_net(plan.schedule.sigmas(), "learned_range")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * plan.prior_scale
    eps_only = DiscreteVPDenoiser(lambda x_vp, t: net(x_vp, t)[:, :2], plan.schedule.sigmas())
    torch.testing.assert_close(SAMPLERS["euler"](plan.denoiser(net), x, plan.sigmas),
                               SAMPLERS["euler"](eps_only, x, plan.sigmas), rtol=0, atol=0)
    with pytest.raises(ValueError, match="variance='learned' needs a model with a variance head"):
        sample_ddpm(eps_only, x, plan.sigmas, variance="learned")
    with pytest.raises(ValueError, match="needs a network output of 4 channels"):
        eps_only_wrong = DiscreteVPDenoiser(lambda x_vp, t: net(x_vp, t)[:, :2], plan.schedule.sigmas(),
                                            variance_type="learned_range")
        eps_only_wrong(x, plan.sigmas[:1].expand(8))
    with pytest.raises(ValueError, match="unknown variance_type"):
        NoiseSchedule.from_diffusers({**SD, "variance_type": "learnt"})
