"""Classifier guidance for the Pipeline (Dhariwal & Nichol 2021): `pipe(..., classifier=..., classifier_scale=...,
label=...)` wraps the (CFG-)guided denoiser in ldm.diffusion.denoiser.ClassifierGuidedDenoiser with the
log p(y | x_t, t) of a noisy classifier (ldm.networks.classifier.NoisyClassifier, trained by ldm.training.classifier).

The classifier reads the VP latents x / sqrt(1 + sigma^2) at the U-Net's own timestep t(sigma) (the denoiser's
sigma -> t lookup), so its gradient is taken in sigma space through that scaling. With the empty prompt and
guidance_scale 1 it guides unconditional sampling, as the paper does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.diffusion.denoiser import (
    ClassifierGuidedDenoiser,
    DiscreteVPDenoiser,
    vp_input_scale,
)
from ldm.loading.sources import DEFAULT_MODEL
from ldm.networks.classifier import NoisyClassifier
from pipelines.call_options import OptionError

Label = int | str


def vp_network_input(denoiser: DiscreteVPDenoiser, x: torch.Tensor,
                     sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / sqrt(1 + sigma^2), t(sigma)): what the U-Net (and a noise-aware network guiding it) reads at sigma (B,)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    t = denoiser.sigma_to_t(sigma.reshape(-1).to(denoiser.train_sigmas.device)).to(x.device, x.dtype)
    return x * vp_input_scale(s), t


class ClassifierLogProb(nn.Module):
    """log p(y_i | x_i, sigma_i) = log_softmax(f(x / sqrt(1 + sigma^2), t(sigma)))[y_i], (B,), for labels y (B,)."""

    def __init__(self, classifier: NoisyClassifier, denoiser: DiscreteVPDenoiser, labels: torch.Tensor) -> None:
        super().__init__()
        self.classifier, self.denoiser, self.labels = classifier, denoiser, labels

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        logits = self.classifier(*vp_network_input(self.denoiser, x, sigma))  # (B, num_classes)
        if self.labels.shape != (x.shape[0],):
            raise ValueError(f"got {len(self.labels)} labels for a batch of {x.shape[0]}")
        return logits.log_softmax(-1).gather(1, self.labels[:, None].to(x.device))[:, 0]


def load_classifier(classifier: NoisyClassifier | str | Path) -> NoisyClassifier:
    """A NoisyClassifier, or one loaded from its folder (config.json + model.safetensors); "default" is the bundled
    model's colour classifier (pipelines/default_model/classifier, docs/default-model.md)."""
    if isinstance(classifier, NoisyClassifier):
        return classifier
    if classifier == "default":
        return NoisyClassifier.from_pretrained(DEFAULT_MODEL / "classifier")
    if isinstance(classifier, (str, Path)):
        return NoisyClassifier.from_pretrained(classifier)
    raise OptionError("classifier", type(classifier).__name__, "a NoisyClassifier or the folder of one")


def check_classifier_options(classifier: NoisyClassifier | str | Path | None, scale: float,
                             label: Label | Sequence[Label] | None, n: int, latent_channels: int,
                             num_train_timesteps: int) -> tuple[NoisyClassifier, torch.Tensor] | None:
    """(classifier, labels (n,)) for a call making n images, or None without a classifier; an OptionError names a
    label out of range, a classifier of another latent width or schedule, or a label / scale without a classifier."""
    if classifier is None:
        if label is not None:
            raise OptionError("label", label, "given with a classifier (classifier=...)")
        return None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale >= 0:
        raise OptionError("classifier_scale", scale, "a number >= 0")
    model = load_classifier(classifier)
    c = model.config
    if c.in_channels != latent_channels:
        raise OptionError("classifier", c.in_channels,
                          text=f"{{option}} takes {c.in_channels}-channel latents (trained at {c.sample_size} x "
                          f"{c.sample_size}) but this model's latents have {latent_channels} channels: a classifier "
                          "of the wrong input shape")
    if c.num_train_timesteps != num_train_timesteps:
        raise OptionError("classifier", c.num_train_timesteps,
                          text=f"{{option}} was trained on {c.num_train_timesteps} timesteps but this model's "
                          f"schedule has {num_train_timesteps}")
    if label is None:
        raise OptionError("label", None, f"the class to guide toward: 0..{c.num_classes - 1} or {list(c.labels)}")
    labels = [label] * n if isinstance(label, (int, str)) else list(label)
    if len(labels) != n:
        raise OptionError("label", label, f"one label, or one per image ({n})")
    try:
        index = [model.label_index(y) for y in labels]
    except ValueError:
        raise OptionError("label", label, f"a class of the classifier: 0..{c.num_classes - 1} or {list(c.labels)}") \
            from None
    return model, torch.tensor(index, dtype=torch.long)


def classifier_guided(model: nn.Module, base: DiscreteVPDenoiser, checked: tuple[NoisyClassifier, torch.Tensor] | None,
                      scale: float, device: torch.device) -> nn.Module:
    """`model` (the pipeline's denoiser, CFG included) with classifier guidance: D + s sigma^2 grad log p(y | x)."""
    if checked is None:
        return model
    classifier, labels = checked
    classifier = classifier.to(device, torch.float32).eval()
    return ClassifierGuidedDenoiser(model, ClassifierLogProb(classifier, base, labels.to(device)), scale)
