"""Where a call starts from an image: image-to-image, and inpainting (repaint the white part of a mask, keep the black).

`prepare_mask` reads a mask as diffusers' StableDiffusionInpaintPipeline does (its mask_processor: a PIL mask resized
with Lanczos, then grey, then binarized at 0.5; arrays and tensors resized nearest); `image_start` encodes the image
and returns an `ImageStart`, which gives the first latents, wraps the guided denoiser and finishes the result:

- an inpainting U-Net (in_channels = 2 * latent + 1, SD-inpainting): the network sees [latents, mask, masked-image
  latents] on channels at every step (the CompVis "c_concat" conditioning; the pipeline's network call appends
  `cond["concat"]`), the masked image being the image with the repainted part set to 0 (grey in [-1, 1]);
- an ordinary U-Net: the known region is re-noised at every step, `RenoiseKnown` (diffusers' behaviour for a
  4-channel U-Net in the same pipeline, RePaint's replacement step without its resampling, Lugmayr et al. 2022,
  eq. 8). The weaker method: the network never sees the mask, so the seam is only as good as the model's sense of
  the noisy context, and the repainted part does not bend to fit the kept part.

Both follow diffusers' start: strength < 1 starts at z0 + sigma * noise on the last int(steps * strength) steps;
strength = 1 starts from the prior (noise * init_noise_sigma) as text-to-image does, the image entering only through
the mask conditioning or the re-noised known region. The VAE posterior's mode is taken where diffusers samples it
(as our image-to-image does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from autoencoder.model import AutoencoderKL
from ldm.diffusion.denoiser import call_with_variance
from ldm.diffusion.variances import VarianceHead
from ldm.loading.components import is_inpainting
from ldm.networks.unet import UNet
from pipelines.images import from_image
from pipelines.vae_precision import run_upcasting

LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2), used for RGB masks given as arrays or tensors
THRESHOLD = 0.5  # diffusers' binarize: >= 0.5 repaints


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of an init image as `pipelines.images.from_image` takes it, before any resizing."""
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    raise TypeError(f"image must be a PIL image, a list of them, a uint8 array or a tensor; got {type(image).__name__}")


def prepare_mask(mask_image: Any, size: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """A mask -> (N, 1, height, width) float in {0, 1}, 1 where to repaint (white). `size`: the init image's
    (height, width), which the mask must have; (height, width): the size the image is resized to.

    PIL images (any mode: grey by PIL's "L" conversion) or a list of them; a numpy array (H, W), (H, W, 1) or (H, W, 3),
    uint8 (0-255) or float / bool in [0, 1]; a tensor (H, W), (N, H, W) or (N, 1 or 3, H, W), float / bool in [0, 1].
    RGB arrays and tensors turn grey with PIL's weights. Resized as diffusers' mask_processor does (PIL: Lanczos before
    the grey conversion; arrays and tensors: nearest), then binarized at 0.5. Another size or range is a ValueError
    naming it."""
    if isinstance(mask_image, Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)) and mask_image and all(isinstance(m, Image.Image) for m in mask_image):
        masks = []
        for m in mask_image:
            _check_size((m.height, m.width), size)
            if (m.height, m.width) != (height, width):
                m = m.resize((width, height), Image.Resampling.LANCZOS)  # diffusers: resize, then grey
            masks.append(torch.from_numpy(np.asarray(m.convert("L"), dtype=np.float32) / 255.0))
        mask = torch.stack(masks)[:, None]  # (N, 1, H, W)
    elif isinstance(mask_image, np.ndarray):
        mask = _array_mask(mask_image)
    elif isinstance(mask_image, torch.Tensor):
        mask = _tensor_mask(mask_image)
    else:
        raise TypeError("mask_image must be a PIL image, a list of them, a numpy array or a tensor; got "
                        f"{type(mask_image).__name__}")
    if not isinstance(mask_image, (list, tuple)):
        _check_size(tuple(mask.shape[-2:]), size)
        if tuple(mask.shape[-2:]) != (height, width):
            mask = F.interpolate(mask, size=(height, width))  # nearest, as diffusers' resize of arrays and tensors
    return (mask >= THRESHOLD).float()


def init_and_mask(image: Any, mask_image: Any, height: int | None, width: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The init image (N, 3, H, W) in [-1, 1] (pipelines.images.from_image: resized to height x width when both are
    given) and its mask (`prepare_mask`, the same size; None without one)."""
    init = from_image(image, height, width)
    if mask_image is None:
        return init, None
    return init, prepare_mask(mask_image, image_size(image), int(init.shape[-2]), int(init.shape[-1]))


def check_inpainting(unet: UNet, vae: AutoencoderKL, mask: torch.Tensor | None) -> None:
    """An inpainting U-Net needs a mask (and so an image): refused by name before any network runs."""
    if mask is None and is_inpainting(unet, vae):
        raise ValueError(f"this U-Net takes {unet.config.in_channels} input channels (latents, mask and masked-image "
                         "latents): an inpainting model; pass image= and mask_image=")


def _check_size(got: tuple[int, ...], size: tuple[int, int]) -> None:
    if tuple(got) != tuple(size):
        raise ValueError(f"mask_image is {got[0]} x {got[1]} (height x width) but the image is {size[0]} x {size[1]}: "
                         "give a mask of the image's size")


def _array_mask(mask: np.ndarray) -> torch.Tensor:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 / float / bool -> (1, 1, H, W) float in [0, 1]."""
    if not (mask.ndim == 2 or (mask.ndim == 3 and mask.shape[-1] in (1, 3))):
        raise ValueError(f"a numpy mask_image must be (H, W), (H, W, 1) or (H, W, 3), got shape {mask.shape}")
    if mask.dtype == np.uint8:
        values = torch.from_numpy(mask.astype(np.float32) / 255.0)
    elif mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.floating):
        values = _in_unit_range(torch.from_numpy(mask.astype(np.float32)), "a float numpy mask_image")
    else:
        raise ValueError(f"a numpy mask_image must be uint8 (0-255), bool or float in [0, 1], got dtype {mask.dtype}")
    values = values if values.ndim == 3 else values[..., None]  # (H, W, C)
    return _grey(values.permute(2, 0, 1)[None])


def _tensor_mask(mask: torch.Tensor) -> torch.Tensor:
    """(H, W), (N, H, W) or (N, 1 or 3, H, W) float / bool in [0, 1] -> (N, 1, H, W) float."""
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]  # (N, H, W), as diffusers reads a 3-D mask tensor
    if mask.ndim != 4 or mask.shape[1] not in (1, 3):
        raise ValueError("a mask_image tensor must be (H, W), (N, H, W) or (N, 1 or 3, H, W), got shape "
                         f"{tuple(mask.shape)}")
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"a mask_image tensor must be float in [0, 1] or bool, got dtype {mask.dtype}")
    return _grey(_in_unit_range(mask.detach().float().cpu(), "a mask_image tensor"))


def _in_unit_range(values: torch.Tensor, what: str) -> torch.Tensor:
    if values.numel() and not (torch.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        lo, hi = values.min().item(), values.max().item()
        raise ValueError(f"{what} must have values in [0, 1] (1: repaint, 0: keep), got min {lo:.3g} max {hi:.3g}"
                         " (a 0-255 mask: pass it as uint8, or divide by 255)")
    return values


def _grey(mask: torch.Tensor) -> torch.Tensor:
    """(N, 1 or 3, H, W) -> (N, 1, H, W), RGB by PIL's luma weights."""
    if mask.shape[1] == 1:
        return mask
    return (mask * torch.tensor(LUMA).reshape(1, 3, 1, 1)).sum(1, keepdim=True)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, H / f, W / f), nearest: diffusers' prepare_mask_latents."""
    return F.interpolate(mask, size=(mask.shape[-2] // factor, mask.shape[-1] // factor))


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the part to repaint set to 0 (grey in [-1, 1]): diffusers' init_image * (mask < 0.5)."""
    return image * (mask < THRESHOLD)


def encode(vae: AutoencoderKL, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> scaled latents: the posterior's mode, float32 (fp16: pipelines.vae_precision)."""
    mode = run_upcasting(vae, lambda v: v.encode(images.to(device, v.dtype)).mode())
    return vae.scale_latents(mode).float()


class RenoiseKnown:
    """D'(x, sigma) = D(m x + (1 - m)(z0 + sigma n), sigma) below the first sigma: the network sees the known region
    (m = 0) as the original z0 noised with the call's noise n to the step's sigma (diffusers' init_latents_proper,
    blended after each step, in sigma space), the repainted region (m = 1) as the sampler left it. Every sampler's
    update is elementwise in x, so the repainted region follows diffusers' post-step blend exactly; `finish` puts z0
    back in the known region of the result. The first step sees the start as it is (diffusers blends only after a
    step: at strength 1 the known region starts as the prior's noise)."""

    def __init__(self, model: Callable[..., torch.Tensor], z0: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor, first_sigma: float) -> None:
        self.model, self.z0, self.noise, self.mask, self.first_sigma = model, z0, noise, mask, first_sigma

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.with_variance(x, sigma, **cond)[0]

    def with_variance(self, x: torch.Tensor, sigma: torch.Tensor,
                      **cond: Any) -> tuple[torch.Tensor, VarianceHead | None]:
        """(x0_hat, the inner model's variance head or None): a learned variance reaches DDPM through the blend."""
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, 1, 1)
        renoised = self.z0 + s * self.noise  # q(z_sigma | z0) with the call's own noise
        blended = self.mask * x + (1 - self.mask) * renoised
        return call_with_variance(self.model, torch.where(s < self.first_sigma, blended, x), sigma, **cond)


@dataclass
class ImageStart:
    """What an init image (and a mask) sets in a call: the steps kept, the image latents z0 (None where unused), and
    for inpainting the latent-grid mask (N, 1, h, w), 1 = repaint, and the masked-image latents of an inpainting
    U-Net (None for an ordinary one)."""

    kept: int
    strength: float
    z0: torch.Tensor | None
    mask: torch.Tensor | None = None
    masked_latents: torch.Tensor | None = None

    def begin(self, noise: torch.Tensor, sigma: torch.Tensor, prior_scale: float) -> torch.Tensor:
        """The first latents (sigma space): z0 + sigma * noise, or for inpainting at strength 1 the prior."""
        if self.mask is not None and self.strength == 1.0:
            return noise * prior_scale  # diffusers' is_strength_max: pure noise * init_noise_sigma
        assert self.z0 is not None
        return self.z0 + noise * sigma  # q(z_t | z_0) in sigma space

    def wrap(self, model: Callable[..., torch.Tensor], cond: dict[str, Any], noise: torch.Tensor,
             first_sigma: float) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
        """The guided denoiser and its keyword arguments for this start: unchanged for image-to-image; an inpainting
        U-Net gets [mask, masked-image latents] as `concat` in each branch's conditioning; an ordinary one the
        re-noised known region (`RenoiseKnown`)."""
        if self.mask is None:
            return model, cond
        if self.masked_latents is None:
            assert self.z0 is not None
            return RenoiseKnown(model, self.z0, noise, self.mask, first_sigma), cond
        concat = torch.cat([self.mask, self.masked_latents], 1)  # (N, 1 + latent, h, w)
        branches = [cond["cond"], cond["uncond"]] if "uncond" in cond else [cond]  # CFGDenoiser's, or the plain one
        for branch in branches:
            branch["concat"] = concat
        return model, cond

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The result: for re-noising inpainting z0 in the known region (diffusers' last blend), else unchanged."""
        if self.mask is None or self.masked_latents is not None:
            return latents
        assert self.z0 is not None
        return self.mask * latents + (1 - self.mask) * self.z0


def image_start(unet: UNet, vae: AutoencoderKL, init: torch.Tensor, mask: torch.Tensor | None, n: int, strength: float,
                steps: int, device: torch.device) -> ImageStart:
    """Encode what the start needs for `n` outputs: keep the last int(steps * strength) steps as diffusers does;
    `init` (1 or n, 3, H, W) in [-1, 1], `mask` (1 or n, 1, H, W) from `prepare_mask` or None (image-to-image).
    An inpainting U-Net (ldm.loading.components.is_inpainting) takes the masked-image latents and needs a mask."""
    kept = min(int(steps * strength), steps)
    inpainting = is_inpainting(unet, vae)
    if mask is None:
        return ImageStart(kept, strength, encode(vae, init, device).expand(n, -1, -1, -1))
    if mask.shape[0] not in (1, n):
        raise ValueError(f"got {mask.shape[0]} masks for {n} outputs (give one, or one per output)")
    mask_latents = latent_mask(mask, vae.config.downsample_factor).to(device).expand(n, -1, -1, -1)
    # an inpainting U-Net at strength 1 starts from the prior alone: no image latents to encode (as diffusers)
    z0 = encode(vae, init, device).expand(n, -1, -1, -1) if not inpainting or strength < 1 else None
    masked = encode(vae, masked_image(init, mask), device).expand(n, -1, -1, -1) if inpainting else None
    return ImageStart(kept, strength, z0, mask_latents, masked)
