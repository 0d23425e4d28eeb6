"""Discrete VP noise schedules and every timestep / sigma construction, matching diffusers' schedulers exactly.

A discrete VP schedule is betas (T,) -> alphā_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4). Samplers work in
sigma space, x = x0 + sigma eps with sigma_t = sqrt((1 - alphā_t) / alphā_t) (Karras et al. 2022, sec. 2).

Betas and alphā are computed in float32, exactly as diffusers does (the numbers the models were trained with);
sigma tables and sampler schedules are returned in float64 (float32 values widened, so lookups stay exact).

Zero terminal SNR (Lin et al. 2023): alphā_{T-1} = 0 gives sigma_max = inf, which no sampler can start from. Like
diffusers' Euler and DPM-Solver schedulers we clamp that one value to alphā_{T-1} = 2**-24 (sigma_max ~ 4096) when
building sigma tables; `NoiseSchedule.alphas_cumprod()` itself keeps the exact 0.

Three flavors of inference timesteps exist in diffusers and are reproduced here:
  "ddim"      DDIMScheduler / DDPMScheduler: integer timesteps ("linspace" rounded); we step from each timestep to
              the next, as DDPMScheduler does. DDIMScheduler steps to t - T//n instead, which differs when the
              timesteps are not T//n apart ("linspace", or "trailing" with n not dividing T): `ddim_step_targets`
              gives those landing points, which the "ddim" sampler takes as step_to (SAMPLERS' entry passes them);
  "euler"     Euler / Euler ancestral / Heun: float timesteps ("linspace" NOT rounded, sigma interpolated linearly);
  "dpmsolver" DPMSolverMultistepScheduler: "linspace"/"leading" over n + 1 points with the last dropped.

The final sigma, too, is per flavor, as in diffusers: DDIM (and PNDM) end at alphā_0 instead of 1 when
`set_alpha_to_one` is False; Euler and DPM-Solver read `final_sigmas_type` and ignore `set_alpha_to_one` (DDPM, Euler
ancestral and Heun always end at 0: pass final_sigma="zero"). A scheduler_config.json without `timestep_spacing`
means "the scheduler class's default", which diffusers' `from_config` also applies when switching schedulers:
"leading" for the ddim flavor, "linspace" for euler and dpmsolver (Stable Diffusion 1.x folders rely on this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch

from ldm.config import from_dict, to_dict
from ldm.diffusion.variances import check_variance_type

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
Spacing = Literal["leading", "trailing", "linspace"]
Flavor = Literal["ddim", "euler", "dpmsolver"]
FinalSigma = Literal["zero", "sigma_min"]
Interpolation = Literal["log", "linear"]
Quantize = bool | Literal["round", "floor"]  # True: "round"

ZERO_SNR_ALPHA_BAR = 2.0**-24  # diffusers' clamp of alphā_{T-1} under zero terminal SNR
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


# ---------------------------------------------------------------------------------------------------------------------
# betas and alphā


MAX_TRAIN_TIMESTEPS = 100_000  # a sane bound (SD and every published schedule: 1000): the tables stay small


def betas_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """beta_t linear from beta_start to beta_end (Ho et al. 2020, sec. 4), float32."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def betas_scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """sqrt(beta_t) linear, squared (Stable Diffusion / LDM, Rombach et al. 2022), float32."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def betas_cosine(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """beta_t = min(1 - f(t+1)/f(t), max_beta), f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008 (Nichol & Dhariwal
    2021, eq. 17), float32."""

    def f(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphā) so that alphā_{T-1} = 0 and alphā_0 is kept (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alphā_t = prod_{s<=t} (1 - beta_s)  (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alphā) / alphā): the VE noise level of a VP marginal (Karras et al. 2022, table 1)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """alphā = 1 / (1 + sigma^2), the inverse of `sigmas_from_alphas_cumprod`."""
    return 1 / (1 + sigmas**2)


# ---------------------------------------------------------------------------------------------------------------------
# the config


@dataclass
class NoiseSchedule:
    """A discrete VP schedule; mirrors the keys of a diffusers scheduler_config.json (defaults: DDPM, Ho et al.)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: list[float] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    timestep_spacing: Spacing | None = "leading"  # None: each flavor's diffusers default (`default_spacing`)
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM flavor: final alphā 1 (sigma 0), else alphā_0 (sigma_min)
    final_sigmas_type: FinalSigma = "zero"  # Euler / DPM-Solver flavors: the final sigma
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False  # read by ldm.diffusion.sigma_schedules.resolve_sigma_schedule
    # DDIM / DDPM clip x0 to [-clip_sample_range, clip_sample_range]; None (a folder without the key): diffusers'
    # class default, True. Our schedules say False: latents are not bounded by 1.
    clip_sample: bool | None = False
    clip_sample_range: float = 1.0
    thresholding: bool = False  # dynamic thresholding (Imagen): not implemented; a folder asking for it is refused
    # DDPMScheduler's variance_type; "learned_range" / "learned": a U-Net with a variance head (diffusion/variances.py)
    variance_type: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_train_timesteps, int) or not 2 <= self.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
            raise ValueError(f"num_train_timesteps must be an integer in [2, {MAX_TRAIN_TIMESTEPS}] (SD uses 1000), got "
                             f"{self.num_train_timesteps!r}")
        if self.thresholding:
            raise ValueError("scheduler config asks for dynamic thresholding (thresholding: true), which is not "
                             "implemented here; set it to false to sample without it")
        check_variance_type(self.variance_type, "scheduler_config")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(self.trained_betas)} values, num_train_timesteps is {self.num_train_timesteps}"
            )

    def betas(self) -> torch.Tensor:
        """beta_t, t = 0..T-1, float32 as in diffusers (zero-SNR rescaling applied if configured)."""
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = betas_linear(T, self.beta_start, self.beta_end)
        elif self.beta_schedule == "scaled_linear":
            betas = betas_scaled_linear(T, self.beta_start, self.beta_end)
        elif self.beta_schedule == "squaredcos_cap_v2":
            betas = betas_cosine(T)
        else:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; valid: linear, scaled_linear, squaredcos_cap_v2")
        return rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    def alphas_cumprod(self) -> torch.Tensor:
        """alphā_t (T,), float32; exactly 0 at t = T-1 under zero terminal SNR."""
        return alphas_cumprod_from_betas(self.betas())

    def sigmas(self) -> torch.Tensor:
        """The training sigma table sigma_t, t = 0..T-1, increasing, float64; alphā_{T-1} clamped to 2**-24 under
        zero terminal SNR (as diffusers' Euler and DPM-Solver do) so that sigma_max is finite."""
        ab = self.alphas_cumprod()
        if self.rescale_betas_zero_snr:
            ab = ab.clone()
            ab[-1] = ZERO_SNR_ALPHA_BAR
        return sigmas_from_alphas_cumprod(ab).double()

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> NoiseSchedule:
        """Build from a diffusers scheduler_config.json dict; keys we do not model are ignored. A missing
        timestep_spacing is None (the class default, as diffusers' from_config); the key "final_sigma" of our
        earlier configs set both final-sigma keys and is still read."""
        ours = {f.name for f in fields(cls)}
        data = {k: v for k, v in config.items() if k in ours}
        data.setdefault("timestep_spacing", None)
        data.setdefault("clip_sample", None)  # absent: the scheduler class's default (DDIM / DDPM clip)
        if "final_sigma" in config:  # legacy: one key for every flavor
            data.setdefault("final_sigmas_type", config["final_sigma"])
            data.setdefault("set_alpha_to_one", config["final_sigma"] == "zero")
        return from_dict(cls, data, where="scheduler_config")

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers scheduler_config.json dict, under diffusers' key names; timestep_spacing and clip_sample None
        (the class defaults) are left out, so a folder read and written keeps meaning what it meant."""
        data = to_dict(self)
        for key in ("timestep_spacing", "clip_sample", "variance_type"):
            if data[key] is None:
                del data[key]
        return data

    def clips_x0(self) -> bool:
        """Whether diffusers' DDIM / DDPM schedulers built from this config clip x0 (their default when unsaid)."""
        return self.clip_sample is not False

    def final_sigma(self, flavor: Flavor) -> FinalSigma:
        """The final sigma diffusers' scheduler of this flavor ends at: set_alpha_to_one for "ddim",
        final_sigmas_type for "euler" / "dpmsolver"."""
        if flavor == "ddim":
            return "zero" if self.set_alpha_to_one else "sigma_min"
        return self.final_sigmas_type


def default_spacing(flavor: Flavor) -> Spacing:
    """diffusers' default timestep_spacing: "leading" for DDIM/DDPM/PNDM, "linspace" for Euler, Heun, DPM-Solver."""
    return "leading" if flavor == "ddim" else "linspace"


def sd_schedule() -> NoiseSchedule:
    """Stable Diffusion 1.x/2.x noise schedule, the one definition in the project: 1000 steps, scaled-linear betas
    0.00085 -> 0.012, "leading" spacing with steps_offset 1, epsilon prediction, ending at sigma = 0 for every sampler.
    Override a field with dataclasses.replace(sd_schedule(), prediction_type=...)."""
    return NoiseSchedule(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         timestep_spacing="leading", steps_offset=1)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """beta_t = 1 - alphā_t / alphā_{t-1}, alphā_{-1} = 1: the inverse of `alphas_cumprod_from_betas`."""
    return 1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])


def shift_snr(schedule: NoiseSchedule, shift: float) -> NoiseSchedule:
    """`schedule` with SNR'(t) = SNR(t) / shift^2, i.e. logSNR shifted by -2 log(shift) (Hoogeboom et al. 2023,
    "simple diffusion"): a schedule made for d x d inputs, shifted by d' / d, gives d' x d' inputs the SNR of their
    d x d average-pooled view that d x d inputs had. The betas go into `trained_betas`, which diffusers reads."""
    if not shift > 0:
        raise ValueError(f"the SNR shift must be > 0, got {shift}")
    if shift == 1:
        return schedule
    ab = schedule.alphas_cumprod().double()
    shifted = ab / (ab + shift**2 * (1 - ab))  # alphā' = SNR' / (1 + SNR'), SNR = alphā / (1 - alphā)
    betas = betas_from_alphas_cumprod(shifted)
    return replace(schedule, trained_betas=betas.tolist(), rescale_betas_zero_snr=False)


# ---------------------------------------------------------------------------------------------------------------------
# inference timesteps and sigma schedules


def inference_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: Spacing = "leading",
    steps_offset: int = 0,
    flavor: Flavor = "ddim",
) -> torch.Tensor:
    """The decreasing timesteps a diffusers scheduler of this flavor visits (float64; integers except "euler"
    linspace). Leading/trailing/linspace: Lin et al. 2023, table 2."""
    import numpy as np  # numpy's rounding (half to even) and float32 linspace are part of the reference behaviour

    T, n = num_train_timesteps, num_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_steps must be in [1, num_train_timesteps={T}], got {n}")
    if flavor not in ("ddim", "euler", "dpmsolver"):
        raise ValueError(f"unknown timestep flavor {flavor!r}; valid: ddim, euler, dpmsolver")
    m = n + 1 if flavor == "dpmsolver" else n  # DPM-Solver places n + 1 points and drops the last
    if spacing == "linspace":
        if flavor == "euler":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        else:
            ts = np.linspace(0, T - 1, m).round()[::-1][:n]
    elif spacing == "leading":
        ratio = T // m
        ts = (np.arange(0, m) * ratio).round()[::-1][:n] + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; valid: leading, trailing, linspace")
    return torch.from_numpy(ts.astype(np.float64).copy())


def ddim_step_targets(schedule: NoiseSchedule, num_steps: int) -> torch.Tensor | None:
    """The (num_steps,) sigmas diffusers' DDIM lands on: it steps from timestep t to t - T // n (Song et al.'s uniform
    skip) and then restarts at the next timestep, whatever that is; with "trailing" or "linspace" spacing the two
    differ. None when every step lands on the next timestep (e.g. "leading"), where walking the schedule is the same."""
    T = schedule.num_train_timesteps
    spacing = schedule.timestep_spacing or default_spacing("ddim")
    walked = sampler_sigmas(schedule, num_steps, "ddim", spacing=spacing, karras=False)
    prev = inference_timesteps(T, num_steps, spacing, schedule.steps_offset, "ddim") - T // num_steps
    targets = walked[1:].clone()
    inside = prev >= 0  # below 0: the final alphā (set_alpha_to_one), i.e. the walked schedule's final sigma
    targets[inside] = schedule.sigmas().double()[prev[inside].long()]
    return None if torch.equal(targets, walked[1:]) else targets


def t_to_sigma(t: torch.Tensor, train_sigmas: torch.Tensor, interpolation: Interpolation = "linear") -> torch.Tensor:
    """sigma(t) for fractional t: linear in sigma (diffusers' np.interp) or linear in log sigma (k-diffusion)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    T = len(train_sigmas)
    if ((t < 0) | (t > T - 1)).any():
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got min {t.min().item()} max {t.max().item()}")
    low = t.floor().long().clamp(max=T - 2)
    w = t - low
    table = train_sigmas.double() if interpolation == "linear" else train_sigmas.double().log()
    out = (1 - w) * table[low] + w * table[low + 1]
    return out if interpolation == "linear" else out.exp()


def sigma_to_t(
    sigma: torch.Tensor,
    train_sigmas: torch.Tensor,
    interpolation: Interpolation = "log",
    quantize: Quantize = False,
) -> torch.Tensor:
    """Fractional timestep of a noise level by inverse interpolation of the training table (the inverse of
    `t_to_sigma`); a sigma equal to table entry k gives exactly t = k. "log" is diffusers' `_sigma_to_t` and
    k-diffusion's; "linear" inverts diffusers' Euler interpolation. quantize "round" (or True) rounds to the nearest
    integer t, "floor" truncates (diffusers' int64 timesteps of exponential sigmas).
    The lower bracket is the LAST table entry <= sigma, as in diffusers: the zero-SNR table is not monotone at its
    end (sigma_998 > the clamped sigma_999 = 4096), and sigma = 4096 must still give t = 999."""
    table = train_sigmas.to(torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64, device=table.device)
    if interpolation == "log":  # "floor" reads the log table in float32 as diffusers does, which puts sigma_max's t
        # just below T - 1 (truncated: T - 2, as diffusers' int64 timesteps of exponential sigmas)
        table = table.float().log().double() if quantize == "floor" else table.log()
        s = s.clamp(min=1e-10).log()
    elif interpolation != "linear":
        raise ValueError(f"unknown interpolation {interpolation!r}; valid: log, linear")
    below = table.reshape(1, -1) <= s.reshape(-1, 1)  # (N, T): the last True is the lower bracket
    idx = torch.arange(1, len(table) + 1, device=table.device)
    low = (below * idx).argmax(-1).clamp(max=len(table) - 2).reshape(s.shape)
    lo, hi = table[low], table[low + 1]
    w = ((s - lo) / (hi - lo)).clamp(0, 1)
    t = low + w
    if quantize == "floor":
        return t.floor()
    return t.round() if quantize else t


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (Karras et al. 2022, eq. 5);
    n values, no final zero."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sampler_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    flavor: Flavor = "euler",
    *,
    spacing: Spacing | None = None,
    karras: bool | None = None,
    final_sigma: FinalSigma | None = None,
) -> torch.Tensor:
    """The (num_steps + 1,) float64 sigma schedule a sampler walks, ending in the final sigma: 0, or
    "sigma_min" = sigma(alphā_0) (DDIM's set_alpha_to_one=False, diffusers' final_sigmas_type="sigma_min").

    Sigmas are the training table interpolated linearly at the flavor's timesteps (as diffusers does), or Karras
    sigmas between the ends diffusers uses for that flavor. Arguments left None come from `schedule`, per flavor
    (`NoiseSchedule.final_sigma`, `default_spacing`).
    """
    spacing = spacing or schedule.timestep_spacing or default_spacing(flavor)
    karras = schedule.use_karras_sigmas if karras is None else karras
    final_sigma = final_sigma or schedule.final_sigma(flavor)
    table = schedule.sigmas()
    ts = inference_timesteps(schedule.num_train_timesteps, num_steps, spacing, schedule.steps_offset, flavor)
    if ts.max() > schedule.num_train_timesteps - 1:
        raise ValueError(f"steps_offset {schedule.steps_offset} pushes a timestep past {schedule.num_train_timesteps - 1}")
    sigmas = t_to_sigma(ts, table, "linear")
    if karras:
        # diffusers' ends: sigma at the lowest and at the highest t, of the full table (DPM) or of the interpolated
        # sigmas (Euler family); under zero SNR sigma_max is the clamped sigma_{T-1} = 4096, not the table's maximum
        ends = table.flip(0) if flavor == "dpmsolver" else sigmas
        sigmas = karras_sigmas(num_steps, ends[-1].item(), ends[0].item())
    if final_sigma == "zero":
        last = torch.zeros(1, dtype=torch.float64)
    elif final_sigma == "sigma_min":
        last = sigmas_from_alphas_cumprod(schedule.alphas_cumprod()[:1]).double()
    else:
        raise ValueError(f"unknown final_sigma {final_sigma!r}; valid: zero, sigma_min")
    return torch.cat([sigmas, last])
