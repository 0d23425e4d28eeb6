"""The learned-variance objectives of `ldm train` (Nichol & Dhariwal 2021): objective.loss "hybrid" (L_simple +
lambda L_vlb, the stop-gradient on the mean in the L_vlb term) and "vlb" (L_vlb alone, timesteps importance-sampled
by the history of L_t^2), with objective.variance "learned_range" (a U-Net with 2C output channels) or "fixed".

The math is ldm.diffusion.losses (vlb_term, hybrid_loss) and ldm.diffusion.variances (LossSecondMomentSampler);
this module holds what the training step adds: the schedule it exports (variance_type, a DDPMScheduler folder) and the
per-process importance-sampler state that checkpoints carry (ldm.training.loop saves `state_dict()`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ldm.config import ConfigError
from ldm.diffusion.losses import hybrid_loss, vlb_term
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.variances import LossSecondMomentSampler, is_learned

VLB_HISTORY = 10  # values of L_t kept per t before importance sampling starts (Nichol & Dhariwal 2021, sec. 3.3)
# diffusers' scheduler that reads a variance head; a learned-variance run exports its folder with it
LEARNED_VARIANCE_SCHEDULER = "DDPMScheduler"


def check_objective(loss: str, variance: str, timestep_bias: str, min_snr_gamma: float | None = None) -> None:
    """The combinations that train something: hybrid needs the variance head; a head needs a variational loss; the
    importance sampler of "vlb" chooses the timesteps and weights, so no timestep_bias or min-SNR weighting with it."""
    if loss == "hybrid" and variance != "learned_range":
        raise ValueError("objective.loss=hybrid trains a variance head (the L_vlb term has no gradient to the mean): "
                         "set objective.variance=learned_range")
    if variance == "learned_range" and loss == "simple":
        raise ValueError("objective.variance=learned_range needs objective.loss=hybrid or vlb (L_simple does not "
                         "train the variance head)")
    if loss == "vlb" and timestep_bias != "none":
        raise ValueError("objective.loss=vlb importance-samples its timesteps: objective.timestep_bias must be none")
    if loss == "vlb" and min_snr_gamma is not None:
        raise ValueError("objective.loss=vlb weights its terms by importance: objective.min_snr_gamma must be null")


def objective_schedule(variance: str, schedule: NoiseSchedule,
                       scheduler_config: dict[str, Any] | None) -> tuple[NoiseSchedule, dict[str, Any] | None]:
    """The schedule (and scheduler_config.json) a run exports: variance_type learned_range and diffusers'
    DDPMScheduler for a variance head; a pretrained folder's learned variance is kept only with variance
    learned_range (else a ConfigError: its U-Net returns 2C channels)."""
    if variance == "learned_range":
        config = {**(scheduler_config or {}), "_class_name": LEARNED_VARIANCE_SCHEDULER}
        return dataclasses.replace(schedule, variance_type="learned_range"), config
    if is_learned(schedule.variance_type):
        raise ConfigError(f"the model's scheduler has variance_type {schedule.variance_type!r} (a U-Net with a "
                         "variance head): set objective.variance=learned_range")
    return schedule, scheduler_config


class VarianceObjective:
    """objective.loss hybrid / vlb on one micro-batch; `timesteps` draws t (importance-sampled for "vlb" once every t
    has VLB_HISTORY values of L_t), `__call__` returns the per-example loss and what to log."""

    def __init__(self, loss: str, variance: str, num_timesteps: int, *, lam: float,
                 min_snr_gamma: float | None) -> None:
        self.loss, self.lam, self.min_snr_gamma = loss, lam, min_snr_gamma
        self.variance: Any = "learned_range" if variance == "learned_range" else "fixed_small"
        self.sampler = LossSecondMomentSampler(num_timesteps, VLB_HISTORY) if loss == "vlb" else None

    def timesteps(self, generators: list[torch.Generator]) -> torch.Tensor | None:
        """Importance-sampled t (B,) for "vlb"; None: the step's own (uniform or timestep_bias)."""
        return None if self.sampler is None else self.sampler.sample(generators)[0]

    def __call__(self, output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(per-example loss (B,), logs): L_hybrid, or T L_t / (T p_t) for "vlb" (its history then updated)."""
        T = len(alphas_cumprod)
        if self.loss == "hybrid":
            weighting = "min_snr" if self.min_snr_gamma is not None else "simple"
            loss, term = hybrid_loss(output, x0, noise, x_t, t, alphas_cumprod, prediction=prediction,
                                     variance=self.variance, lam=self.lam, weighting=weighting,
                                     gamma=self.min_snr_gamma or 5.0)
            return loss, {"vlb_term": float(term.detach().mean())}
        term = vlb_term(output, x0, x_t, t, alphas_cumprod, prediction=prediction, variance=self.variance)
        assert self.sampler is not None
        weights = 1.0 / (T * self.sampler.probabilities()[t.cpu()])  # p_t as drawn, before this update
        self.sampler.update(t.cpu(), term)
        return T * term * weights.to(term), {"vlb_term": float(term.detach().mean())}

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sampler is None else {"vlb_sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sampler is not None:
            if "vlb_sampler" not in state:
                raise ValueError("the checkpoint holds no importance-sampler state for objective.loss=vlb")
            self.sampler.load_state_dict(state["vlb_sampler"])
