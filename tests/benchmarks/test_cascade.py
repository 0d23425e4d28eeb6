"""benchmarks/cascade.py: its sharpness and fidelity measures on images with closed-form answers (constants,
sinusoids, ramps, offsets), the resizing it scores with, and the section it writes into docs/quality.md."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import cascade as C
from benchmarks import quality as Q


def _cosines(n: int, terms: list[tuple[float, int]]) -> np.ndarray:
    """(1, n, n, 3): sum of a cos(2 pi k x / n) over (a, k), the same in every channel and row."""
    x = np.arange(n)
    row = sum(a * np.cos(2 * np.pi * k * x / n) for a, k in terms)
    return np.broadcast_to(row[None, None, :, None], (1, n, n, 3)).copy()


def test_high_frequency_share_of_a_constant_is_zero():
    assert C.high_frequency_share(np.full((2, 32, 32, 3), 0.7), 0.1).tolist() == [0.0, 0.0]
    assert C.rms_gradient(np.full((1, 32, 32, 3), 0.7)).tolist() == [0.0]


@pytest.mark.parametrize("k, cutoff, want", [(4, 0.05, 1.0), (4, 0.07, 0.0), (20, 0.25, 1.0), (20, 0.32, 0.0)])
def test_high_frequency_share_of_one_sinusoid(k, cutoff, want):
    """cos(2 pi k x / 64) holds all its energy at k / 64 cycles per pixel (4: 0.0625, 20: 0.3125)."""
    assert C.high_frequency_share(_cosines(64, [(0.3, k)]), cutoff)[0] == pytest.approx(want, abs=1e-12)


def test_high_frequency_share_of_two_sinusoids_is_the_energy_ratio():
    """a cos(low) + b cos(high): the share above a cutoff between them is b^2 / (a^2 + b^2) (Parseval)."""
    a, b = 0.4, 0.1
    got = C.high_frequency_share(_cosines(64, [(a, 3), (b, 24)]), 1 / 8)[0]
    assert got == pytest.approx(b ** 2 / (a ** 2 + b ** 2), rel=1e-12)
    assert got == pytest.approx(1 / 17, rel=1e-12)


def test_rms_gradient_of_a_ramp_is_its_slope_and_falls_as_an_edge_blurs():
    n, slope = 16, 0.01
    ramp = np.broadcast_to((np.arange(n) * slope)[None, None, :, None], (1, n, n, 3))
    assert C.rms_gradient(ramp)[0] == pytest.approx(slope, rel=1e-12)
    diagonal = np.broadcast_to(((np.arange(n)[:, None] + np.arange(n)[None, :]) * slope)[None, ..., None], (1, n, n, 3))
    assert C.rms_gradient(diagonal)[0] == pytest.approx(slope * math.sqrt(2), rel=1e-12)
    # a step of height 1 spread over w columns of n: per row w differences of 1 / w, mean square (1 / w) / (n - 1)
    for w in (1, 4):
        edge = np.clip((np.arange(n) - 4) / w, 0, 1)
        step = np.broadcast_to(edge[None, None, :, None], (1, n, n, 3))
        assert C.rms_gradient(step)[0] == pytest.approx(math.sqrt(1 / w / (n - 1)), rel=1e-12)


def test_psnr_and_rmse_closed_forms():
    x = np.random.default_rng(0).uniform(0.2, 0.8, (2, 16, 16, 3))
    p, r = C.psnr_rmse(x, x)
    assert np.isinf(p).all() and (r == 0).all()
    p, r = C.psnr_rmse(x + 0.1, x)  # a uniform offset d: RMSE d, PSNR 20 log10(1 / d) = 20 dB
    assert r == pytest.approx([0.1, 0.1], rel=1e-9)
    assert p == pytest.approx([20.0, 20.0], abs=1e-4)  # psnr computes in float32


def test_resize_keeps_constants_and_true_renders_score_as_their_captions():
    assert np.allclose(C.resize(np.full((1, 64, 64, 3), 0.25), 256), 0.25, atol=1e-6)
    assert np.allclose(C.resize(np.full((1, 256, 256, 3), 0.25), 64), 0.25, atol=1e-6)
    renders, captions = Q.test_images(6, "test", 0, size=256)
    row = C.measures(captions, renders)  # scored at 64 px, as the benchmark scores the cascade
    assert row["all"] == 1.0 and row["n"] == 6
    bicubic = C.resize(C.resize(renders, 64), 256)
    assert C.measures(captions, bicubic)["hf_share"] < row["hf_share"]  # bicubic loses the edges' high frequencies


def test_replace_section_appends_then_replaces_in_place():
    doc = "# Quality\n\n## A\n\ntext\n"
    once = C.replace_section(doc, C.SECTION, f"{C.SECTION}\n\nfirst\n")
    assert once == f"# Quality\n\n## A\n\ntext\n\n{C.SECTION}\n\nfirst\n"
    later = once + "\n## Z\n\nother\n"
    again = C.replace_section(later, C.SECTION, f"{C.SECTION}\n\nsecond\n### sub\n")
    assert again == f"# Quality\n\n## A\n\ntext\n\n{C.SECTION}\n\nsecond\n### sub\n\n## Z\n\nother\n"
