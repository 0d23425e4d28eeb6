"""Samplers: stateless functions walking a sigma schedule with a denoiser D(x, sigma) = E[x0 | x] (sigma space).

Every sampler has the signature of docs/CONVENTIONS.md:

    sample_<name>(model, x, sigmas, *, cond=None, generator=None, callback=None, **options) -> Tensor

- model(x, sigma, **cond) -> x0_hat with sigma of shape (B,); x is (B, ...), the initial noise times sigmas[0].
- sigmas: 1-D, strictly decreasing, >= 0 (ldm.diffusion.sigma_schedules); the result is x at sigmas[-1].
- generator: a torch.Generator or one per batch item (`ldm.random`); callback(i, sigma, x, x0_hat) after step i.

`SAMPLERS` maps a name to a `Sampler`: the function and the schedule facts of its diffusers counterpart (which
scheduler's timesteps it walks, whether it ends at sigma 0, whether it returns VP coordinates), so a caller builds the
sigma schedule from the entry alone (`SAMPLERS[name].sigmas(schedule, steps)`). Add an entry to register a new
sampler (those of ldm/diffusion/sde.py, samplers_multistep.py and samplers_dpmpp.py are registered here too).
`sample(model, x, sigmas, sampler="euler", **options)` dispatches on it.

The probability-flow ODE in sigma space is dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4 with
s = 1, sigma(t) = t). Model-evaluation counts (NFE) for n = len(sigmas) - 1 steps ending at 0: n for all samplers but
heun and dpmpp_2s_ancestral (2n - 1). Noise draws (one standard normal of x's shape per step, after the model call,
whenever eta > 0) follow diffusers' order, so the same seeded generator gives the same numbers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from ldm.random import Generator, randn_like
from ldm.diffusion.denoiser import DiscreteVPDenoiser, call_with_variance
from ldm.diffusion.sampling import Callback, Denoiser, ancestral_step, check_sigmas, denoise, to_d
from ldm.diffusion.samplers_dpmpp import sample_dpmpp_2m_sde, sample_dpmpp_2s_ancestral, sample_dpmpp_3m_sde
from ldm.diffusion.samplers_multistep import sample_lms, sample_unipc
from ldm.diffusion.schedule import Flavor, NoiseSchedule, ddim_step_targets, default_spacing
from ldm.diffusion.sde import sample_langevin, sample_pc, sample_reverse_sde
from ldm.diffusion.sigma_schedules import resolve_sigma_schedule, schedule_sigmas, sigma_lookup, table_schedule
from ldm.diffusion.variances import VarianceHead, step_log_variance

@torch.no_grad()
def sample_euler(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE: x <- x + (sigma_next - sigma) d (Karras et al. 2022, alg. 1)."""
    s = check_sigmas(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, i)
        x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler to sigma_down, then fresh noise of std sigma_up (`ancestral_step`); eta = 1 is diffusers'
    EulerAncestralDiscreteScheduler and DDPM's posterior, eta = 0 is plain Euler."""
    return _ancestral(model, x, sigmas, cond, generator, callback, eta, s_noise, None, None)


@torch.no_grad()
def _ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: dict[str, Any] | None,
               generator: Generator, callback: Callback, eta: float, s_noise: float,
               clip_x0: float | None, step_to: torch.Tensor | None) -> torch.Tensor:
    """x <- x0_hat + sigma_down eps_hat + sigma_up z toward step_to[i] (default: the next sigma), then relabelled to
    the next sigma keeping the VP sample x / sqrt(1 + sigma^2); clip_x0 = r clamps the x0 term alone to [-r, r]."""
    s = check_sigmas(sigmas)
    targets = s[1:] if step_to is None else [float(v) for v in step_to]
    if len(targets) != len(s) - 1:
        raise ValueError(f"step_to has {len(targets)} sigmas for {len(s) - 1} steps")
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, i)
        down, up = ancestral_step(s[i], targets[i], eta)
        x0 = denoised if clip_x0 is None else denoised.clamp(-clip_x0, clip_x0)
        x = x0 + to_d(x, s[i], denoised) * down
        if eta > 0:
            x = x + randn_like(x, generator) * (s_noise * up)
        if targets[i] != s[i + 1]:
            x = x * math.sqrt((1 + s[i + 1] ** 2) / (1 + targets[i] ** 2))
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None, eta: float = 0.0, clip_x0: float | None = None,
    step_to: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_prev = x0_hat + sqrt(sigma_next^2 - sigma_up^2) eps_hat + sigma_up z.

    Divided by sqrt(alphā_prev), the VP update sqrt(ā_prev) x0 + sqrt(1 - ā_prev - std^2) eps + std z becomes exactly
    this with sigma_up = std / sqrt(ā_prev) = eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), i.e. the
    ancestral Euler step with the same eta; eta = 0 is Euler's method on the probability-flow ODE. clip_x0 = r clamps
    x0_hat to [-r, r] in the first term only, eps_hat staying the network's: diffusers' DDIM with clip_sample.
    step_to (ldm.diffusion.schedule.ddim_step_targets): the sigma each step lands on where it is not the next one,
    after which the VP sample restarts at the next sigma, as diffusers' DDIM does with "trailing" / "linspace" spacing.
    """
    return _ancestral(model, x, sigmas, cond, generator, callback, eta, 1.0, clip_x0, step_to)


@torch.no_grad()
def sample_ddpm(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None,
    variance: Literal["small", "large", "learned"] | None = None, clip_x0: float | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the posterior q(x_prev | x, x0_hat) (Ho et al. 2020, eqs. 6-7), in sigma space:
    mean = x0 + (sigma_next^2 / sigma^2)(x - x0); variance "small" = beta~ / ā_prev = sigma_next^2 (sigma^2 -
    sigma_next^2) / sigma^2, "large" = beta / ā_prev = (sigma^2 - sigma_next^2)(1 + sigma_next^2) / (1 + sigma^2),
    "learned" = the model's own (Nichol & Dhariwal 2021, eq. 15: a denoiser exposing `with_variance`, e.g.
    DiscreteVPDenoiser(variance_type="learned_range"); ldm.diffusion.variances.step_log_variance, diffusers'
    DDPMScheduler reading, no noise from t = 0). None: "learned" when the model gives a variance, else "small".
    clip_x0 = r clamps x0_hat to [-r, r] before the posterior (Ho et al.'s clipping; diffusers' clip_sample)."""
    if variance not in (None, "small", "large", "learned"):
        raise ValueError(f"unknown DDPM variance {variance!r}; valid: small, large, learned (None: the model's if any)")
    s = check_sigmas(sigmas)
    for i in range(len(s) - 1):
        sig, nxt = s[i], s[i + 1]
        if variance in (None, "learned"):
            denoised, head = _denoise_with_variance(model, x, sig, cond, i)
        else:
            denoised, head = denoise(model, x, sig, cond, i), None
        if variance == "learned" and head is None:
            raise ValueError("variance='learned' needs a model with a variance head (a denoiser with with_variance, "
                             "e.g. DiscreteVPDenoiser(variance_type='learned_range')); this one gives none")
        if clip_x0 is not None:
            denoised = denoised.clamp(-clip_x0, clip_x0)
        mean = denoised + (nxt**2 / sig**2) * (x - denoised)
        if head is not None:  # no noise from t = 0, as diffusers
            std = (0.5 * step_log_variance(head, sig, nxt)).exp() * (head.t > 0).reshape(-1, *[1] * (x.ndim - 1))
        elif variance in (None, "small"):
            std = math.sqrt(nxt**2 * (sig**2 - nxt**2) / sig**2)
        else:
            std = math.sqrt((sig**2 - nxt**2) * (1 + nxt**2) / (1 + sig**2)) if nxt > 0 else 0.0
        x = mean + randn_like(x, generator) * std
        if callback is not None:
            callback(i, sig, x, denoised)
    return x


def _denoise_with_variance(model: Denoiser, x: torch.Tensor, sigma: float, cond: dict[str, Any] | None,
                           i: int) -> tuple[torch.Tensor, VarianceHead | None]:
    """`denoise` (its checks) through `call_with_variance`: (x0_hat, the model's variance head or None)."""
    heads: list[VarianceHead | None] = []

    def call(xi: torch.Tensor, si: torch.Tensor, **c: Any) -> torch.Tensor:
        denoised, head = call_with_variance(model, xi, si, **c)
        heads.append(head)
        return denoised

    return denoise(call, x, sigma, cond, i), heads[0]


@torch.no_grad()
def sample_heun(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None,
) -> torch.Tensor:
    """Heun's 2nd-order method (trapezoidal corrector; Karras et al. 2022, alg. 1); Euler on the last step to 0."""
    s = check_sigmas(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, i)
        d = to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_next = to_d(x_pred, s[i + 1], denoise(model, x_pred, s[i + 1], cond, i))
            x = x + (d + d_next) / 2 * dt
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, cond: dict[str, Any] | None = None,
    generator: Generator = None, callback: Callback = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in sigma space, lambda = -log sigma, h = lambda_next - lambda:
    x_next = (sigma_next / sigma) x - expm1(-h) D', D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h;
    first-order (D' = D_i) on the first step and on a final step to sigma = 0."""
    s = check_sigmas(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoise(model, x, s[i], cond, i)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            if old_denoised is None:
                d_prime = denoised
            else:
                r = h_last / h
                d_prime = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d_prime
            h_last = h
        old_denoised = denoised
        if callback is not None:
            callback(i, s[i], x, denoised)
    return x


@dataclass(frozen=True)
class SamplingPlan:
    """What a sampler walks on a schedule, as its diffusers scheduler would: the schedule as that scheduler reads it
    (build the denoiser on it), the (n + 1,) float64 sigmas, the sigma schedule they follow (ldm.diffusion.
    sigma_schedules: it sets the denoiser's sigma -> t lookup), the options they imply for the sampler function
    (clip_x0, DDIM's step_to), and the prior the walk starts from: `prior_scale` times standard noise (its diffusers
    scheduler's init_noise_sigma, in sigma space)."""

    schedule: NoiseSchedule
    sigmas: torch.Tensor
    sigma_schedule: str
    options: dict[str, Any]
    flavor: Flavor = "euler"
    ve_prior: bool = False  # start at sigma_max * noise (diffusers' Euler family with linspace / trailing spacing)

    @property
    def karras(self) -> bool:
        return self.sigma_schedule == "karras"

    @property
    def prior_scale(self) -> float:
        """sigma_max (VE prior) or sqrt(1 + sigma_max^2) (the VP prior N(0, I) in sigma space)."""
        top = float(self.sigmas[0])
        return top if self.ve_prior else math.sqrt(1 + top**2)

    def denoiser(self, net: Callable[..., torch.Tensor]) -> DiscreteVPDenoiser:
        """The VP network `net(x_vp, t, **cond)` as D(x, sigma) on this plan's schedule, with the sigma -> t lookup its
        diffusers scheduler uses (`sigma_lookup`: e.g. log-linear for Karras sigmas, rounded to integer t for
        DPM-Solver's)."""
        interpolation, quantize = sigma_lookup(self.sigma_schedule, self.flavor)
        return DiscreteVPDenoiser(net, self.schedule.sigmas(), self.schedule.prediction_type,
                                  interpolation=interpolation, quantize=quantize,
                                  variance_type=self.schedule.variance_type)

    def last(self, steps: int) -> SamplingPlan:
        """The plan of the last `steps` steps (img2img), step-indexed options cut alike."""
        n = len(self.sigmas) - 1
        if not 1 <= steps <= n:
            raise ValueError(f"cannot keep {steps} of {n} steps")
        options = {k: (v[n - steps:] if k == "step_to" else v) for k, v in self.options.items()}
        return replace(self, sigmas=self.sigmas[n - steps:], options=options)


@dataclass(frozen=True)
class Sampler:
    """A sampler function with the schedule facts that make it walk the sigmas of its diffusers scheduler."""

    fn: Callable[..., torch.Tensor]
    flavor: Flavor = "euler"  # whose inference timesteps it walks: diffusers' Euler, DDIM or DPM-Solver family
    ends_at_zero: bool = False  # its diffusers scheduler ends at sigma 0 whatever set_alpha_to_one / final_sigmas_type say
    vp_output: bool = False  # its diffusers scheduler returns VP coordinates: a final sigma > 0 is divided out
    clips_x0: bool = False  # takes clip_x0, as its diffusers scheduler clips x0 where clip_sample says (DDIM, DDPM)
    skips_uniformly: bool = False  # takes step_to: it steps t -> t - T // n as diffusers' DDIM (ddim_step_targets)
    reads_zero_snr: bool = True  # its diffusers scheduler applies rescale_betas_zero_snr (Heun's ignores it)

    def __call__(self, model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, **options: Any) -> torch.Tensor:
        return self.fn(model, x, sigmas, **options)

    def sigmas(self, schedule: NoiseSchedule, num_steps: int, *, karras: bool | None = None,
               sigma_schedule: str | None = None) -> torch.Tensor:
        """The (num_steps + 1,) float64 sigmas this sampler walks on `schedule` (ldm.diffusion.sigma_schedules.
        schedule_sigmas; `resolve_sigma_schedule` reads the two switches); the final sigma is 0 where the diffusers
        scheduler forces it, else the schedule's own for this flavor."""
        name = resolve_sigma_schedule(schedule, sigma_schedule, karras)
        final = "zero" if self.ends_at_zero else None
        return schedule_sigmas(schedule, num_steps, self.flavor, name, final_sigma=final)

    def to_output(self, x: torch.Tensor, final_sigma: float) -> torch.Tensor:
        """The result in the coordinates its diffusers scheduler returns: x / sqrt(1 + sigma^2) for VP output."""
        return x / math.sqrt(1 + final_sigma**2) if self.vp_output and final_sigma > 0 else x

    def plan(self, schedule: NoiseSchedule, num_steps: int, *, karras: bool | None = None,
             sigma_schedule: str | None = None) -> SamplingPlan:
        """Everything a caller needs to sample as the diffusers scheduler of this sampler does on `schedule`:
        `schedule_for`, `sigmas` and `schedule_options` in one (sigma_schedule and karras None: the schedule's
        use_karras_sigmas / use_exponential_sigmas; karras=True is sigma_schedule="karras")."""
        name = resolve_sigma_schedule(schedule, sigma_schedule, karras)
        schedule = self.schedule_for(schedule, name)
        # diffusers' Euler, Euler ancestral and Heun start from sigma_max * noise under linspace / trailing spacing
        # (their init_noise_sigma), from sqrt(1 + sigma_max^2) * noise otherwise, as DDIM, DDPM and DPM-Solver always do
        spacing = schedule.timestep_spacing or default_spacing(self.flavor)
        ve_prior = self.flavor == "euler" and spacing in ("linspace", "trailing")
        return SamplingPlan(schedule, self.sigmas(schedule, num_steps, sigma_schedule=name), name,
                            self.schedule_options(schedule, num_steps, sigma_schedule=name), self.flavor, ve_prior)

    def schedule_for(self, schedule: NoiseSchedule, sigma_schedule: str = "default") -> NoiseSchedule:
        """`schedule` as this sampler's diffusers scheduler reads it: diffusers' Heun ignores rescale_betas_zero_snr,
        so on a zero-terminal-SNR folder it samples the un-rescaled betas, and so does ours (equal names, equal images;
        Euler or DPM-Solver++ sample the rescaled schedule); "sgm_uniform" is its trailing spacing (`table_schedule`)."""
        if schedule.rescale_betas_zero_snr and not self.reads_zero_snr:
            schedule = replace(schedule, rescale_betas_zero_snr=False)
        return table_schedule(schedule, sigma_schedule)

    def schedule_options(self, schedule: NoiseSchedule, num_steps: int, *, karras: bool = False,
                         sigma_schedule: str | None = None) -> dict[str, Any]:
        """The options `schedule` implies for this sampler as for its diffusers scheduler: clip_x0 for DDIM / DDPM
        where clip_sample says so (or a scheduler config leaves it out: their default), and DDIM's step_to where
        it does not step to the next timestep (on the training table's timesteps only)."""
        name = "karras" if karras else (sigma_schedule or "default")
        options: dict[str, Any] = {}
        if self.clips_x0 and schedule.clips_x0():
            options["clip_x0"] = schedule.clip_sample_range
        if (self.skips_uniformly and name in ("default", "sgm_uniform")
                and (targets := ddim_step_targets(table_schedule(schedule, name), num_steps)) is not None):
            options["step_to"] = targets
        return options

    def accepts(self, option: str) -> bool:
        """Whether the function takes the keyword `option` (e.g. "eta")."""
        return option in inspect.signature(self.fn).parameters


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(sample_ddpm, flavor="ddim", ends_at_zero=True, vp_output=True, clips_x0=True),
    "ddim": Sampler(sample_ddim, flavor="ddim", vp_output=True, clips_x0=True, skips_uniformly=True),
    "euler": Sampler(sample_euler),
    "euler_ancestral": Sampler(sample_euler_ancestral, ends_at_zero=True),
    "heun": Sampler(sample_heun, ends_at_zero=True, reads_zero_snr=False),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, flavor="dpmsolver", vp_output=True),
    "dpmpp_2m_sde": Sampler(sample_dpmpp_2m_sde, flavor="dpmsolver", vp_output=True),
    "dpmpp_3m_sde": Sampler(sample_dpmpp_3m_sde, flavor="dpmsolver", vp_output=True),
    "dpmpp_2s_ancestral": Sampler(sample_dpmpp_2s_ancestral, ends_at_zero=True),  # k-diffusion's; no diffusers twin
    "unipc": Sampler(sample_unipc, flavor="dpmsolver", vp_output=True),
    "lms": Sampler(sample_lms, ends_at_zero=True, reads_zero_snr=False),
    "reverse_sde": Sampler(sample_reverse_sde),
    "pc": Sampler(sample_pc),
    "langevin": Sampler(sample_langevin),
}


def sample(
    model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, sampler: str = "euler", **options: Any
) -> torch.Tensor:
    """Run the sampler registered under `sampler` in `SAMPLERS`; options go to it (cond, generator, eta, ...)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {sorted(SAMPLERS)}")
    return SAMPLERS[sampler](model, x, sigmas, **options)
