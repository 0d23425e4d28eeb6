"""Conditioning augmentation against closed forms and torchvision: the blur kernel sums to 1 and equals torchvision's
gaussian_blur per image (fp32, <= 1e-6); the noised input's mean and variance are the schedule's (sqrt(alphā) m and
alphā v + 1 - alphā, within 5 standard errors of 2 M samples); draws per item depend only on that item's generator."""

import math

import pytest
import torch
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from ldm.diffusion import conditioning_augmentation as A
from ldm.diffusion.schedule import NoiseSchedule


@pytest.mark.parametrize("sigma", [0.0, 0.3, 0.5, 1.0, 2.5])
def test_kernel_sums_to_one_and_is_symmetric(sigma):
    k = A.gaussian_kernel1d(torch.tensor([sigma]), A.kernel_size_for(sigma))[0]
    assert abs(k.sum().item() - 1) < 1e-6 and torch.equal(k, k.flip(0))
    if sigma == 0:
        assert torch.equal(k, torch.tensor([0.0, 1.0, 0.0]))  # the identity
    else:  # the closed form: ratios of neighbours are exp(-(2x + 1) / (2 sigma^2))
        half = len(k) // 2
        assert math.isclose(k[half + 1] / k[half], math.exp(-1 / (2 * sigma**2)), rel_tol=1e-5)


def test_blur_equals_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 12, 10, generator=g)
    sigmas = torch.tensor([0.4, 0.6, 1.7])
    ours = A.gaussian_blur(images, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        k = A.kernel_size_for(max(sigmas.tolist()))
        ref = tv_gaussian_blur(images[i:i + 1], [k, k], [s, s])
        assert (ours[i:i + 1] - ref).abs().max() <= 1e-6
    assert (ours - images).abs().max() > 0.05  # the blur does something
    same = A.gaussian_blur(images, 0.5, kernel_size=3)
    assert (same - tv_gaussian_blur(images, [3, 3], [0.5, 0.5])).abs().max() <= 1e-6
    const = torch.full((1, 3, 8, 8), 0.3)
    assert (A.gaussian_blur(const, 1.0) - 0.3).abs().max() <= 1e-6  # the kernel sums to 1: constants stay
    assert torch.equal(A.gaussian_blur(images, 0.0), images)


def test_bad_blur_input_is_named():
    with pytest.raises(ValueError, match="kernel_size must be a positive odd"):
        A.gaussian_kernel1d(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="finite and >= 0"):
        A.gaussian_kernel1d(torch.tensor([-1.0]), 3)
    with pytest.raises(ValueError, match=r"one per image \(2,\)"):
        A.gaussian_blur(torch.zeros(2, 3, 8, 8), torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="needs images larger than"):
        A.gaussian_blur(torch.zeros(1, 3, 4, 4), 3.0)


@pytest.mark.parametrize("level", [0, 20, 350, 999])
def test_noised_input_has_the_schedules_mean_and_variance(level):
    ab = NoiseSchedule().alphas_cumprod()  # the x4 upscaler's low_res_scheduler: DDPM's linear betas
    n, m, v = 2_000_000, 0.5, 0.25
    g = torch.Generator().manual_seed(level)
    x0 = (m + math.sqrt(v) * torch.randn(1, 1, 1000, n // 1000, generator=g, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = A.augment(x0, ab.double(), blur_sigma=0.0, noise_level=level, noise=noise)
    a = ab[level].item()
    var = a * v + (1 - a)  # Var[sqrt(a) x0 + sqrt(1 - a) eps] = a v + (1 - a)
    assert abs(xt.mean().item() - math.sqrt(a) * m) < 5 * math.sqrt(var / n)
    assert abs(xt.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_random_draws_are_in_range_and_per_item():
    gens = [torch.Generator().manual_seed(s) for s in range(6)]
    levels = A.random_noise_levels(6, 350, gens)
    assert levels.dtype == torch.long and levels.min() >= 0 and levels.max() <= 350
    sigmas = A.random_blur_sigmas(2000, (0.4, 0.6), 0.5, torch.Generator().manual_seed(1))
    blurred = sigmas[sigmas > 0]
    assert blurred.min() >= 0.4 and blurred.max() <= 0.6
    assert abs(len(blurred) / 2000 - 0.5) < 5 * math.sqrt(0.25 / 2000)  # Bernoulli(0.5), 5 standard errors
    assert not A.random_blur_sigmas(50, (0.4, 0.6), 0.0).any()
    assert (A.random_blur_sigmas(50, (0.4, 0.6), 1.0) >= 0.4).all()
    # item i depends on generator i alone: the same seed gives the same augmentation whatever the batch
    low = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = dict(sigma_range=(0.4, 0.6), blur_prob=0.5, max_noise_level=350)
    ab = NoiseSchedule().alphas_cumprod()
    batch, batch_levels = A.random_augment(low, ab, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)],
                                           **kw)
    one, one_levels = A.random_augment(low[1:2], ab, generator=[torch.Generator().manual_seed(8)], **kw)
    assert torch.equal(batch_levels[1:2], one_levels)
    torch.testing.assert_close(batch[1:2], one, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="need 0 <= lo <= hi"):
        A.random_blur_sigmas(2, (0.6, 0.4), 0.5)
