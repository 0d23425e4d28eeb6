"""What every sampler shares: the finiteness check at each step on the CPU, once at the end elsewhere."""

import pytest
import torch

from ldm.diffusion.sampling import FiniteWatch, denoise


def test_finite_watch_names_the_first_bad_step_after_the_loop():
    watch = FiniteWatch()
    x = torch.zeros(2, 3)
    for i, (sigma, value) in enumerate([(5.0, 1.0), (2.0, 1.0), (1.0, float("inf")), (0.5, float("nan"))]):
        watch(i, sigma, x, torch.full_like(x, value))
    assert all(f.device == x.device and f.dtype == torch.bool for f in watch.flags)  # flags only: no host wait
    with pytest.raises(FloatingPointError, match=r"step 2 \(sigma=1\)"):
        watch.check()


def test_finite_watch_passes_finite_steps_and_an_empty_loop():
    FiniteWatch().check()
    watch = FiniteWatch()
    for i in range(3):
        watch(i, 1.0 / (i + 1), torch.zeros(1), torch.ones(1))
    watch.check()


def test_denoise_checks_at_once_on_the_cpu():
    with pytest.raises(FloatingPointError, match=r"step 4 \(sigma=0.25\)"):
        denoise(lambda x, s: x * float("nan"), torch.ones(2, 1), 0.25, None, 4)
    with pytest.raises(ValueError, match="step 1: the model returned shape"):
        denoise(lambda x, s: x[:1], torch.ones(2, 1), 0.25, None, 1)
