"""pipelines/images.py: init-image range check and resizing of numpy/tensor inputs to a given height/width."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.images import from_image


def test_tensor_outside_unit_range_is_refused():
    ok = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_image(ok), ok * 2 - 1, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got min -1 max 1.*\(image \+ 1\) / 2"):
        from_image(torch.linspace(-1, 1, 192).reshape(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*max 255"):
        from_image(torch.full((1, 3, 8, 8), 255.0))


def test_ramp_resizes_to_the_pixel_centres():
    """A horizontal ramp v(x) = x / 63 halved to 32 columns: bicubic with antialiasing is a symmetric, normalised
    kernel, so away from the borders (support 4 input pixels) column j equals v at its centre 2j + 0.5 (atol 1e-6);
    height/width given for tensors and arrays are honoured (they were ignored)."""
    ramp = (torch.arange(64, dtype=torch.float32) / 63).expand(1, 3, 48, 64)
    out = from_image(ramp, height=24, width=32)
    assert out.shape == (1, 3, 24, 32)
    centres = (2 * torch.arange(32, dtype=torch.float32) + 0.5) / 63 * 2 - 1
    torch.testing.assert_close(out[0, 0, 5, 3:-3], centres[3:-3], rtol=0, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1
    array = np.full((48, 64, 3), 200, dtype=np.uint8)
    out = from_image(array, height=16, width=24)
    assert out.shape == (1, 3, 16, 24)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 127.5 - 1), rtol=0, atol=1e-6)  # constant stays
    assert from_image(array).shape == (1, 3, 48, 64)  # no size given: unchanged


def test_pil_tensor_and_array_agree_without_resizing():
    array = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    a = from_image(array, height=16, width=24)
    b = from_image(Image.fromarray(array), height=16, width=24)
    c = from_image(torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255, height=16, width=24)
    assert torch.equal(a, b)
    torch.testing.assert_close(c, a, rtol=0, atol=1e-6)
