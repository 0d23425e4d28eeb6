"""The VAE in fp16 with an fp32 fallback: decode (and encode) in the pipeline's half precision, as diffusers'
StableDiffusionPipeline does (half the decoder's peak memory, about twice as fast on a GPU), and where the output
overflows (the SDXL VAE and, at some inputs, the SD one: inf / nan in fp16) upcast the VAE to fp32 for good and run
again, so no image comes back black."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from autoencoder.model import AutoencoderKL


def run_upcasting(vae: AutoencoderKL, fn: Callable[[AutoencoderKL], torch.Tensor]) -> torch.Tensor:
    """fn(vae) in the VAE's dtype; an fp16 result that is not finite is computed again in fp32, the VAE staying fp32
    from then on (pipe.to(dtype=torch.float16) tries fp16 again). One host synchronisation per call, on the result."""
    out = fn(vae)
    if vae.dtype != torch.float16 or bool(torch.isfinite(out).all()):
        return out
    what = "(force_upcast in its config)" if vae.config.force_upcast else "(force_upcast is False in its config)"
    warnings.warn(f"the VAE overflowed in float16 {what}: it runs in float32 from now on", stacklevel=3)
    vae.to(torch.float32)
    return fn(vae)
