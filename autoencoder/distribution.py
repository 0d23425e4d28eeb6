"""The diagonal Gaussian posterior q(z | x) = N(mean, diag(exp(logvar))) of the KL autoencoder.

The encoder emits `parameters` of shape (B, 2C, h, w): the first C channels are the mean, the last C the log-variance,
clamped to [-30, 20] as diffusers and CompVis do so that exp() neither underflows nor overflows
(Kingma & Welling 2014; Rombach et al. 2022, sec. 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.diffusion.process import continuous_gaussian_log_likelihood, normal_kl
from ldm.random import Generator, randn

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def gaussian_kl_standard(mean: torch.Tensor, logvar: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, I)) = 1/2 sum(mean^2 + e^logvar - 1 - logvar)  (Kingma & Welling 2014, app. B)."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=tuple(dims))


def gaussian_kl(
    mean: torch.Tensor,
    logvar: torch.Tensor,
    other_mean: torch.Tensor,
    other_logvar: torch.Tensor,
    dims: Sequence[int],
) -> torch.Tensor:
    """KL(N(m1, v1) || N(m2, v2)) = 1/2 sum((m1 - m2)^2 / v2 + v1 / v2 - 1 - log v1 + log v2), diagonal covariances."""
    return normal_kl(mean, logvar, other_mean, other_logvar).sum(dim=tuple(dims))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """-log N(x; mean, e^logvar) = 1/2 sum(log 2 pi + logvar + (x - mean)^2 / e^logvar)  (Kingma & Welling 2014)."""
    return -continuous_gaussian_log_likelihood(x, mean, 0.5 * logvar).sum(dim=tuple(dims))


class DiagonalGaussian:
    """q(z | x) with mean and clamped log-variance split along dim 1 of the encoder output (B, 2C, ...)."""

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.ndim < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(
                "DiagonalGaussian expects encoder moments of shape (B, 2C, ...) with an even channel count, "
                f"got shape {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        """Standard deviation exp(logvar / 2)."""
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        """Variance exp(logvar)."""
        return torch.exp(self.logvar)

    @property
    def _sum_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.mean.ndim))

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterization trick (Kingma & Welling 2014, eq. 10)."""
        eps = randn(self.mean.shape, generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The mode (= mean) of the Gaussian posterior (Kingma & Welling 2014)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> torch.Tensor:
        """KL(q || N(0, I)) (or KL(q || other)) per sample, summed over all non-batch dims (Kingma & Welling 2014, app. B)."""
        if other is None:
            return gaussian_kl_standard(self.mean, self.logvar, self._sum_dims)
        return gaussian_kl(self.mean, self.logvar, other.mean, other.logvar, self._sum_dims)

    def nll(self, x: torch.Tensor, dims: Sequence[int] | None = None) -> torch.Tensor:
        """-log q(x) per sample, summed over `dims` (default: all non-batch dims) (Kingma & Welling 2014)."""
        if x.shape != self.mean.shape:
            raise ValueError(f"nll: x has shape {tuple(x.shape)}, the distribution has shape {tuple(self.mean.shape)}")
        return gaussian_nll(x, self.mean, self.logvar, self._sum_dims if dims is None else dims)
