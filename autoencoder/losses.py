"""Training loss of the KL autoencoder: reconstruction + beta * KL, with an optional PatchGAN adversarial term.

The generator objective follows Rombach et al. 2022 (app. G) / Esser et al. 2021 (taming transformers, eq. 5-7):

    L = rec(x, x_rec) + beta * KL(q(z|x) || N(0, I)) + lambda * f(step) * (-E[D(x_rec)])

where rec and KL are summed over a sample's dimensions and averaged over the batch (as the CompVis code does),
lambda = disc_weight * ||grad_last rec|| / (||grad_last G|| + 1e-4) is the adaptive weight computed at the decoder's
last layer, and f(step) = disc_factor once `step >= disc_start`, else 0 (the warm-up). The discriminator is the
PatchGAN of Isola et al. 2017 trained with the hinge loss (Lim & Ye 2017). No perceptual (LPIPS) term: it needs
downloaded VGG weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.distribution import DiagonalGaussian


@dataclass
class VAELossConfig:
    """Loss weights; defaults are the Stable Diffusion VAE's (kl_weight 1e-6, disc_start 50001, disc_weight 0.5)."""

    reconstruction: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1.0e-6
    use_discriminator: bool = True
    disc_start: int = 50001
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_in_channels: int = 3
    disc_channels: int = 64
    disc_num_layers: int = 3
    max_adaptive_weight: float = 1.0e4

    def __post_init__(self) -> None:
        if self.reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {self.reconstruction!r}")
        for name in ("kl_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {self.disc_start}")
        if self.disc_num_layers < 1 or self.disc_channels < 1 or self.disc_in_channels < 1:
            raise ValueError("disc_num_layers, disc_channels and disc_in_channels must be >= 1")


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-sample sum of |x - x_rec| (L1) or (x - x_rec)^2 (L2), shape (B,) (Rombach et al. 2022, app. G)."""
    if x.shape != x_rec.shape:
        raise ValueError(f"reconstruction_loss: x {tuple(x.shape)} and x_rec {tuple(x_rec.shape)} differ in shape")
    diff = x - x_rec
    if kind == "l1":
        err = diff.abs()
    elif kind == "l2":
        err = diff.pow(2)
    else:
        raise ValueError(f"reconstruction kind must be 'l1' or 'l2', got {kind!r}")
    return err.flatten(1).sum(1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])  (Lim & Ye 2017; Esser et al. 2021)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator adversarial loss -E[D(x_rec)]  (Esser et al. 2021, eq. 5)."""
    return -logits_fake.mean()


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    *,
    max_weight: float = 1.0e4,
    eps: float = 1.0e-4,
) -> torch.Tensor:
    """lambda = ||grad_L rec|| / (||grad_L G|| + eps), clamped to [0, max], detached  (Esser et al. 2021, eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + eps)
    return weight.clamp(0.0, max_weight).detach()


def warmup_factor(step: int, start: int, value: float) -> float:
    """`value` once `step >= start`, else 0: the discriminator warm-up of Esser et al. 2021 (sec. 3.2)."""
    return value if step >= start else 0.0


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, pix2pix `NLayerDiscriminator`): one logit per overlapping patch.

    conv4x4/2 -> LeakyReLU, (num_layers - 1) x [conv4x4/2 -> BatchNorm -> LeakyReLU], conv4x4/1 -> BatchNorm ->
    LeakyReLU, conv4x4/1 -> 1 channel. Input H and W must be at least 3 * 2^num_layers (else the output is empty).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.num_layers = num_layers
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialization of Isola et al. 2017: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02), bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_size = 3 * 2**self.num_layers
        if x.shape[-1] < min_size or x.shape[-2] < min_size:
            raise ValueError(
                f"PatchDiscriminator with {self.num_layers} layers needs images of at least {min_size}x{min_size}, "
                f"got {tuple(x.shape[-2:])}; use fewer disc_num_layers"
            )
        return self.main(x)  # (B, 1, h', w')


class VAELoss(nn.Module):
    """The autoencoder's two objectives: `generator_loss` (for the VAE) and `discriminator_loss` (for D)."""

    def __init__(self, config: VAELossConfig | None = None) -> None:
        super().__init__()
        self.config = config or VAELossConfig()
        c = self.config
        self.discriminator = (
            PatchDiscriminator(c.disc_in_channels, c.disc_channels, c.disc_num_layers) if c.use_discriminator else None
        )

    def disc_active(self, step: int) -> bool:
        """Whether the adversarial terms are on at this global step (after the warm-up)."""
        return self.discriminator is not None and warmup_factor(step, self.config.disc_start, self.config.disc_factor) > 0

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """rec + beta KL (+ lambda f(step) G after warm-up), batch means of per-sample sums; returns (loss, logs)."""
        c = self.config
        rec = reconstruction_loss(x, x_rec, c.reconstruction).mean()
        kl = posterior.kl().mean()
        loss = rec + c.kl_weight * kl
        logs = {"rec": rec.detach(), "kl": kl.detach()}
        if self.disc_active(step):
            if last_layer is None:
                raise ValueError("generator_loss needs last_layer (the decoder's conv_out.weight) once the discriminator is on")
            g = hinge_g_loss(self.discriminator(x_rec))
            if self.training and torch.is_grad_enabled():
                d_weight = adaptive_weight(rec, g, last_layer, max_weight=c.max_adaptive_weight) * c.disc_weight
            else:  # no graph to differentiate: weight 0 as in taming's evaluation path
                d_weight = torch.zeros((), device=x.device, dtype=x.dtype)
            factor = warmup_factor(step, c.disc_start, c.disc_factor)
            loss = loss + d_weight * factor * g
            logs.update(g=g.detach(), d_weight=d_weight.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """f(step) * hinge(D(x), D(x_rec)) on detached inputs; exactly 0 before the warm-up ends. Returns (loss, logs)."""
        if self.discriminator is None:
            raise ValueError("discriminator_loss called but VAELossConfig.use_discriminator is False")
        factor = warmup_factor(step, self.config.disc_start, self.config.disc_factor)
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        return loss, logs
