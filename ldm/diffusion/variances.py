"""Learned reverse-process variances (Nichol & Dhariwal 2021, sec. 3.1) and the importance sampler of L_vlb (sec. 3.3).

A network with a variance head returns 2C channels: the C channels of its eps / v / x0 prediction, then C channels v,
read as diffusers' DDPMScheduler reads them (`variance_type`):

- "learned_range": log Sigma_t = frac log beta_t + (1 - frac) log beta~_t with frac = (v + 1) / 2 (Nichol & Dhariwal
  eq. 15; the raw output in [-1, 1] is mapped to [0, 1], values outside it are not clipped);
- "learned": v is the variance Sigma_t itself (diffusers' DDPMScheduler reading; improved-diffusion's LEARNED reads v
  as log Sigma_t instead), so it must be > 0.

How the head reaches a sampler: `ldm.diffusion.denoiser.DiscreteVPDenoiser(variance_type=...)` splits it off and
exposes it through `with_variance(x, sigma, **cond) -> (x0_hat, VarianceHead)`, its plain call staying the one
denoiser interface; `sample_ddpm` reads it (`step_log_variance`). The losses that train it are in
ldm/diffusion/losses.py (`vlb_term`, `hybrid_loss`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

VarianceType = Literal["learned", "learned_range"]
LEARNED_VARIANCES: tuple[str, ...] = ("learned", "learned_range")
# diffusers' DDPMScheduler variance types; only the learned ones change what the network returns
DIFFUSERS_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", *LEARNED_VARIANCES)
MIN_POSTERIOR_VARIANCE = 1e-20  # diffusers' clamp on beta~_t before its log (beta~ = 0 on a step to sigma 0)


def is_learned(variance_type: str | None) -> bool:
    """Whether a scheduler's variance_type asks the network for a variance head (2C output channels)."""
    return variance_type in LEARNED_VARIANCES


def check_variance_type(variance_type: str | None, where: str = "") -> None:
    """variance_type must be None or one of diffusers' DDPMScheduler variance types."""
    if variance_type is not None and variance_type not in DIFFUSERS_VARIANCE_TYPES:
        where = f"{where}: " if where else ""
        raise ValueError(f"{where}unknown variance_type {variance_type!r}; valid: {list(DIFFUSERS_VARIANCE_TYPES)}")


def check_variance_channels(in_channels: int, out_channels: int, variance_type: str | None, where: str = "") -> None:
    """A network returns C channels with a fixed variance and 2C with a learned one; anything else is an error."""
    check_variance_type(variance_type, where)
    where = f"{where}: " if where else ""
    want = 2 * in_channels if is_learned(variance_type) else in_channels
    if out_channels != want:
        kind = (f"variance_type {variance_type!r}" if variance_type is not None
                else "no variance_type (a fixed variance)")
        hint = ("a U-Net with a variance head (out_channels = 2 * in_channels) needs variance_type 'learned_range' or "
                "'learned' in scheduler_config.json" if out_channels == 2 * in_channels else
                f"with {kind} the U-Net must return {want} channels for its {in_channels} inputs")
        raise ValueError(f"{where}the U-Net returns {out_channels} channels for {in_channels} inputs but the scheduler "
                         f"says {kind}: {hint}")


def split_variance(output: torch.Tensor, channels: int,
                   variance_type: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prediction, variance head) of a 2C-channel output (dim 1); (output, None) for a fixed variance."""
    if not is_learned(variance_type):
        return output, None
    if output.shape[1] != 2 * channels:
        raise ValueError(f"variance_type {variance_type!r} needs a network output of {2 * channels} channels "
                         f"(prediction and variance), got {output.shape[1]}")
    prediction, head = output.split(channels, dim=1)
    return prediction, head


def learned_range_log_variance(v: torch.Tensor, log_beta_tilde: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """log Sigma = frac log beta_t + (1 - frac) log beta~_t, frac = (v + 1) / 2 (Nichol & Dhariwal 2021, eq. 15)."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def model_log_variance(variance_type: str, v: torch.Tensor, log_beta_tilde: torch.Tensor,
                       log_beta: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta of a variance head: eq. 15 for "learned_range", log v for "learned" (diffusers' reading)."""
    if variance_type == "learned_range":
        return learned_range_log_variance(v, log_beta_tilde, log_beta)
    if variance_type == "learned":
        if v.device.type == "cpu" and not bool((v > 0).all()):
            raise ValueError("variance_type 'learned' reads the head as the variance itself, which must be > 0; "
                             f"got a minimum of {v.min().item():.3g}")
        return v.log()
    raise ValueError(f"unknown learned variance type {variance_type!r}; valid: {list(LEARNED_VARIANCES)}")


class VarianceHead(NamedTuple):
    """A network's variance channels as a denoiser's `with_variance` returns them, with the (fractional) timestep
    t (B,) they were predicted at."""

    kind: str
    values: torch.Tensor  # (B, C, ...)
    t: torch.Tensor  # (B,)

    def chunk(self, n: int) -> tuple[VarianceHead, ...]:
        """The head of each of n equal batch chunks (CFG's [uncond; cond] batch)."""
        return tuple(VarianceHead(self.kind, v, t) for v, t in zip(self.values.chunk(n), self.t.chunk(n), strict=True))


def step_log_variance(head: VarianceHead, sigma: float, sigma_next: float) -> torch.Tensor:
    """log of the sigma-space variance of the DDPM step sigma -> sigma_next with a learned Sigma (eq. 15), as
    diffusers' DDPMScheduler (learned / learned_range) computes it in VP coordinates: beta_t = 1 - alphā_t /
    alphā_prev, beta~_t clamped to 1e-20, the VP variance times 1 + sigma_next^2 = 1 / alphā_prev."""
    large = (sigma**2 - sigma_next**2) / (1 + sigma**2)  # beta_t of the step (VP)
    small = max(sigma_next**2 * (sigma**2 - sigma_next**2) / (sigma**2 * (1 + sigma_next**2)), MIN_POSTERIOR_VARIANCE)
    v = head.values
    log_vp = model_log_variance(head.kind, v, v.new_tensor(math.log(small)), v.new_tensor(math.log(large)))
    return log_vp + math.log1p(sigma_next**2)


# ---------------------------------------------------------------------------------------------------------------------
# importance sampling of L_vlb


class LossSecondMomentSampler:
    """Importance sampling of timesteps for L_vlb (Nichol & Dhariwal 2021, eq. 17): p_t proportional to
    sqrt(E[L_t^2]) over the last `history` values of L_t seen for each t, uniform until every t has `history` of them;
    a `uniform` share of the mass stays uniform (improved-diffusion's LossSecondMomentResampler). Per-example loss
    weights 1 / (T p_t) keep E_t[w_t L_t] = mean_t L_t unbiased."""

    def __init__(self, num_timesteps: int, history: int = 10, uniform: float = 0.001) -> None:
        if num_timesteps < 1 or history < 1 or not 0 <= uniform <= 1:
            raise ValueError(f"need num_timesteps >= 1, history >= 1, uniform in [0, 1]; got {num_timesteps}, "
                             f"{history}, {uniform}")
        self.num_timesteps, self.history_size, self.uniform = num_timesteps, history, uniform
        self.history = torch.zeros(num_timesteps, history, dtype=torch.float64)  # (T, history), oldest first
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)  # values seen per t (capped at `history`)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history_size).all())

    def probabilities(self) -> torch.Tensor:
        """p_t (T,), float64: uniform before warm-up, else sqrt(mean L_t^2), mixed with `uniform` of uniform mass."""
        T = self.num_timesteps
        if not self.warmed_up():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = self.history.pow(2).mean(1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform) + self.uniform / T

    def sample(self, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, weights): one t per example from its generator, and the loss weights 1 / (T p_t), (B,) each."""
        p = self.probabilities()
        t = torch.cat([torch.multinomial(p, 1, generator=g) for g in generators])
        return t, 1.0 / (self.num_timesteps * p[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record L_t (one per example) for timesteps t, the newest last in each t's window."""
        for ti, loss in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            n = int(self.counts[ti])
            if n == self.history_size:
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = loss
            else:
                self.history[ti, n] = loss
                self.counts[ti] = n + 1

    def state_dict(self) -> dict[str, Any]:
        """The history as JSON-ready lists (float64 values round-trip exactly through JSON)."""
        return {"history": self.history.tolist(), "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = torch.tensor(state["history"], dtype=torch.float64)
        counts = torch.tensor(state["counts"], dtype=torch.long)
        if history.shape != self.history.shape or counts.shape != self.counts.shape:
            raise ValueError(f"importance-sampler state of shape {tuple(history.shape)} does not fit "
                             f"{tuple(self.history.shape)} (num_timesteps x history)")
        self.history, self.counts = history, counts
