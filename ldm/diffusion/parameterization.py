"""Conversions between the epsilon, x0, v and score parameterizations of a VP diffusion x_t = a x0 + s eps.

Here a = sqrt(alphā_t) and s = sqrt(1 - alphā_t) (Ho et al. 2020, eq. 4). v = a eps - s x0 (Salimans & Ho 2022,
sec. 4) and the score of q(x_t | x0) marginalised over x0 is grad log p(x_t) = -E[eps | x_t] / s (Song et al. 2021).
`alpha_bar` broadcasts against the data: pass it shaped (B, 1, ..., 1) or as a scalar tensor.
"""

from __future__ import annotations

from typing import Literal

import torch

Prediction = Literal["epsilon", "sample", "v_prediction"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "sample", "v_prediction")


def _a_s(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alphā) eps) / sqrt(alphā)  (Ho et al. 2020, eq. 15)."""
    a, s = _a_s(alpha_bar)
    return (x_t - s * eps) / a


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(alphā) x0) / sqrt(1 - alphā)."""
    a, s = _a_s(alpha_bar)
    return (x_t - a * x0) / s


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alphā) eps - sqrt(1 - alphā) x0  (Salimans & Ho 2022, sec. 4)."""
    a, s = _a_s(alpha_bar)
    return a * eps - s * x0


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(alphā) x_t - sqrt(1 - alphā) v."""
    a, s = _a_s(alpha_bar)
    return a * x_t - s * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - alphā) x_t + sqrt(alphā) v."""
    a, s = _a_s(alpha_bar)
    return s * x_t + a * v


def score_from_eps(eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """grad log p(x_t) = -eps / sqrt(1 - alphā)  (Song et al. 2021, eq. 3 with Tweedie)."""
    return -eps / (1 - alpha_bar).sqrt()


def eps_from_score(score: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = -sqrt(1 - alphā) grad log p(x_t)."""
    return -score * (1 - alpha_bar).sqrt()


def to_x0(prediction: Prediction, x_t: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 estimate from a network output of the given parameterization."""
    if prediction == "epsilon":
        return x0_from_eps(x_t, output, alpha_bar)
    if prediction == "v_prediction":
        return x0_from_v(x_t, output, alpha_bar)
    if prediction == "sample":
        return output
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")


def to_eps(prediction: Prediction, x_t: torch.Tensor, output: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps estimate from a network output of the given parameterization."""
    if prediction == "epsilon":
        return output
    if prediction == "v_prediction":
        return eps_from_v(x_t, output, alpha_bar)
    if prediction == "sample":
        return eps_from_x0(x_t, output, alpha_bar)
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")


def target(prediction: Prediction, x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The regression target of a network of this parameterization, given the clean data and the noise."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha_bar)
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTIONS)}")
