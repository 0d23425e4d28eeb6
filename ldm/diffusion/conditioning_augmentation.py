"""Conditioning augmentation of a super-resolution stage's low-resolution input (cascaded diffusion, Ho et al. 2021,
sec. 3.2 and 4.2): Gaussian blur with a random sigma, and Gaussian noise at a sampled level of a schedule (the x4
upscaler's `noise_level`, its U-Net's class label), both at training time; at sampling time a fixed blur sigma and
noise level, so the stage sees the kind of input it was trained on and forgives the previous stage's errors.

Pure tensor functions. Randomness comes from a generator or one per batch item (ldm.random's convention, as the
training loop's per-slot generators), so an item's augmentation does not depend on the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ldm.diffusion.process import q_sample
from ldm.random import Generator, randn


def gaussian_kernel1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels exp(-x^2 / (2 sigma^2)) / Z on x = -(k-1)/2 .. (k-1)/2, one row per sigma:
    (B,) -> (B, k), each row summing to 1 (torchvision's _get_gaussian_kernel1d); sigma 0 is the identity kernel."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    if bool((sigma < 0).any()) or not bool(torch.isfinite(sigma).all()):
        raise ValueError(f"blur sigmas must be finite and >= 0, got {sigma.tolist()}")
    x = torch.arange(kernel_size, dtype=torch.float32, device=sigma.device) - (kernel_size - 1) / 2  # (k,)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma.clamp_min(1e-12)[:, None]) ** 2)  # (B, k); sigma 0: a unit impulse
    return pdf / pdf.sum(dim=1, keepdim=True)


def kernel_size_for(sigma: float) -> int:
    """The odd kernel size covering +-3 sigma (at least 3): 2 ceil(3 sigma) + 1."""
    return max(3, 2 * math.ceil(3 * sigma) + 1)


def gaussian_blur(images: torch.Tensor, sigma: float | torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
    """Blur (B, C, H, W) images with a Gaussian of standard deviation `sigma` (a float, or (B,): one per image),
    separably after reflect padding: torchvision's gaussian_blur, per image. `kernel_size` None: kernel_size_for the
    largest sigma. (torchvision takes one sigma for the whole batch; augmentation needs one per image.)"""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=images.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(b)
    if sigma.shape != (b,):
        raise ValueError(f"sigma must be a float or one per image ({b},), got shape {tuple(sigma.shape)}")
    k = kernel_size if kernel_size is not None else kernel_size_for(float(sigma.max()))
    if k // 2 >= min(h, w):
        raise ValueError(f"blur kernel size {k} needs images larger than {k // 2} pixels, got {h} x {w}")
    kernel = gaussian_kernel1d(sigma, k).to(images.dtype).repeat_interleave(c, dim=0)  # (B * C, k)
    x = F.pad(images.reshape(1, b * c, h, w), [k // 2] * 4, mode="reflect")  # (1, B C, H + k - 1, W + k - 1)
    x = F.conv2d(x, kernel[:, None, None, :], groups=b * c)  # horizontal pass
    x = F.conv2d(x, kernel[:, None, :, None], groups=b * c)  # vertical pass
    return x.reshape(b, c, h, w)


def uniform(n: int, generator: Generator = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) draws of U[0, 1), item i from generator i when given one per item."""
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for a batch of {n}")
        u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator])
    else:
        u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
    return u.to(device) if device is not None else u


def random_blur_sigmas(n: int, sigma_range: tuple[float, float], prob: float, generator: Generator = None
                       ) -> torch.Tensor:
    """(n,) blur sigmas: with probability `prob` uniform in [lo, hi], else 0 (no blur); two draws per item, the
    choice first."""
    lo, hi = sigma_range
    if not 0 <= lo <= hi or not 0 <= prob <= 1:
        raise ValueError(f"need 0 <= lo <= hi and prob in [0, 1], got sigma range {sigma_range}, prob {prob}")
    apply, u = uniform(n, generator), uniform(n, generator)
    return torch.where(apply < prob, lo + u * (hi - lo), torch.zeros_like(u))


def random_noise_levels(n: int, max_level: int, generator: Generator = None) -> torch.Tensor:
    """(n,) integer noise levels uniform in {0, ..., max_level} (the timesteps of the low-res schedule)."""
    if max_level < 0:
        raise ValueError(f"max_level must be >= 0, got {max_level}")
    return (uniform(n, generator) * (max_level + 1)).long().clamp_max(max_level)


def augment(low_res: torch.Tensor, alphas_cumprod: torch.Tensor, *, blur_sigma: float | torch.Tensor,
            noise_level: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Blur, then noise to `noise_level` of the schedule: sqrt(alphā) blur(x) + sqrt(1 - alphā) noise (Ho et al.
    2020, eq. 4; the x4 upscaler's low_res_scheduler.add_noise). Fixed values at sampling, sampled ones in training."""
    levels = torch.as_tensor(noise_level, device=low_res.device).long().reshape(-1).expand(low_res.shape[0])
    blurred = low_res if not bool(torch.as_tensor(blur_sigma).any()) else gaussian_blur(low_res, blur_sigma)
    return q_sample(blurred, levels, alphas_cumprod.to(low_res.device), noise)


def random_augment(low_res: torch.Tensor, alphas_cumprod: torch.Tensor, *, sigma_range: tuple[float, float],
                   blur_prob: float, max_noise_level: int, generator: Generator = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time augmentation: a random blur (`random_blur_sigmas`), a random noise level
    (`random_noise_levels`) and its noise, per item from its generator; returns (augmented, levels (B,) long), the
    levels being the U-Net's class labels."""
    n = low_res.shape[0]
    sigmas = random_blur_sigmas(n, sigma_range, blur_prob, generator)  # on the CPU: the kernel size needs no sync
    levels = random_noise_levels(n, max_noise_level, generator).to(low_res.device)
    noise = randn(low_res.shape, generator, device=low_res.device, dtype=low_res.dtype)
    return augment(low_res, alphas_cumprod, blur_sigma=sigmas, noise_level=levels, noise=noise), levels
