"""How much memory a generation call needs, against what its device has: a call that cannot fit is refused before any
network runs, with the estimate, instead of swapping, being killed or failing after minutes.

The estimate (`call_bytes`) is the largest of the phases of a call, each from the configs and the size, plus
OVERHEAD (the kernels' scratch and the allocator's slack, measured at 60-120 MiB for the bundled and SD models):

- U-Net, on the batch B' = B (2B with guidance) at latent size h x w, in the networks' dtype: the widest level of the
  down path, per pixel of that level K_ATTENTION x channels + ATTENTION_TOKEN where it has attention (a transformer
  block alone holds ~21 x channels per token: its GEGLU feed-forward is 8 channels wide; the rest is the skips and
  the resnets' tensors alive beside it), K_RESNET x channels where it has not;
- VAE decoder, on B at H x W, in the VAE's dtype: K_DECODER x (input + output channels of a level) x its pixels at
  the level where that is largest (for SD's VAE the full-resolution one, fed by the 256-channel upsample), plus the
  decoded image's float32 copies, numpy array and 8-bit images (OUTPUT_BYTES per pixel);
- VAE encoder (img2img), on B at H x W: K_ENCODER x (3 + 2 x the first level's channels) + 16 values per pixel.

Attention is computed by scaled_dot_product_attention, whose fused kernels (flash on the CPU, flash or
memory-efficient on CUDA) keep no tokens x tokens matrix, so nothing grows with the square of the pixels, nor with
the text's length (77 tokens per window of a long prompt, ldm.networks.prompt_encoder), which adds only its keys and
values: SD 1.5's U-Net at batch 2 measured 192 / 260 MiB with 16 windows (1232 tokens) against 177 / 245 MiB with one
(256 / 384 px; estimates 204 / 300 MiB), so the estimate leaves the length out. The constants
are fitted to the peak memory `python benchmarks/memory.py` measures (each phase in a fresh process on the CPU; tiny,
bundled and SD 1.5 shapes): the estimate is 1.06-1.33x the measured peak for SD 1.5's shapes, 1.2-1.8x for the
bundled model at 1024 px, more at small sizes where OVERHEAD dominates (benchmarks/results/memory.md; repeated runs
of one case differ by up to ~30%).

Available memory (`available_bytes`): on CUDA torch.cuda.mem_get_info's free bytes plus what torch's allocator holds
unused; on the CPU /proc/meminfo's MemAvailable, or the cgroup's limit less its usage where that is lower (a
container); unknown elsewhere (MPS, non-Linux): no check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# calibrated against measured peaks (benchmarks/memory.py); see the module docstring
K_ATTENTION = 28.0  # values per channel and pixel of an attention level (SD 1.5: 27-30 measured)
ATTENTION_TOKEN = 800.0  # values per pixel of an attention level whatever its width (the tiny model: 46 x 32 channels)
K_RESNET = 14.0  # values per channel and pixel of a level without attention (measured 13.4, the bundled level 0)
K_DECODER = 2.5  # values per (input + output) channel and pixel of a decoder level (measured 2.5, SD and bundled)
K_ENCODER = 3.0  # values per (3 + 2 first-level channels) and pixel of the encoder (measured 2.4-3.0)
OVERHEAD = 128 * 2**20
OUTPUT_BYTES = 3 * (4 * 4 + 1)  # 3 channels: four float32 copies (decode, scale, clamp, numpy), one uint8
FLOOR_BYTES = 3 * (4 + 1)  # the float32 image and its 8-bit copy: what any model needs per output pixel


class MemoryEstimateError(ValueError):
    """A call whose estimated memory exceeds what its device has available."""


@dataclass(frozen=True)
class Estimate:
    """Bytes a call needs at its peak (`total`) and the phase that sets it."""

    unet: int
    decoder: int
    encoder: int = 0

    @property
    def total(self) -> int:
        return max(self.unet, self.decoder, self.encoder)

    def describe(self) -> str:
        parts = [f"U-Net {format_bytes(self.unet)}", f"VAE decoder {format_bytes(self.decoder)}"]
        if self.encoder:
            parts.append(f"VAE encoder {format_bytes(self.encoder)}")
        return ", ".join(parts)


def unet_bytes(config: Any, batch: int, h: int, w: int, itemsize: int) -> int:
    """Peak activation bytes of one U-Net call on (batch, in_channels, h, w) latents (module docstring)."""
    peak = 0.0
    for level, (c, kind) in enumerate(zip(config.block_out_channels, config.down_block_types, strict=True)):
        pixels = math.ceil(h / 2**level) * math.ceil(w / 2**level)
        per_pixel = K_ATTENTION * c + ATTENTION_TOKEN if kind.startswith("CrossAttn") else K_RESNET * c
        peak = max(peak, per_pixel * pixels)
    return int(batch * itemsize * peak) + OVERHEAD


def decoder_bytes(config: Any, batch: int, height: int, width: int, itemsize: int) -> int:
    """Peak bytes of decoding `batch` images of height x width, the outputs included (module docstring)."""
    ch = tuple(reversed(config.block_out_channels))
    n = len(ch)
    peak = 0
    for i in range(n):
        pixels = math.ceil(height / 2 ** (n - 1 - i)) * math.ceil(width / 2 ** (n - 1 - i))
        peak = max(peak, int(K_DECODER * (ch[max(i - 1, 0)] + ch[i]) * pixels))
    return batch * (itemsize * peak + OUTPUT_BYTES * height * width) + OVERHEAD


def encoder_bytes(config: Any, batch: int, height: int, width: int, itemsize: int) -> int:
    """Peak bytes of encoding `batch` init images of height x width (img2img)."""
    c = config.block_out_channels[0]
    return int(batch * itemsize * (K_ENCODER * (3 + 2 * c) + 16) * height * width) + OVERHEAD


def call_bytes(unet_config: Any, vae_config: Any, *, batch: int, height: int, width: int, factor: int,
               unet_itemsize: int, vae_itemsize: int, guided: bool = True, img2img: bool = False) -> Estimate:
    """The estimate of a call making `batch` images of height x width (factor: the VAE's downsampling factor)."""
    h, w = math.ceil(height / factor), math.ceil(width / factor)
    unet = unet_bytes(unet_config, batch * (2 if guided else 1), h, w, unet_itemsize)
    decoder = decoder_bytes(vae_config, batch, height, width, vae_itemsize)
    encoder = encoder_bytes(vae_config, batch, height, width, vae_itemsize) if img2img else 0
    return Estimate(unet, decoder, encoder)


def floor_bytes(batch: int, height: int, width: int) -> int:
    """What `batch` images of height x width need whatever the model: the decoded image in float32 and 8 bits."""
    return batch * FLOOR_BYTES * height * width


def available_bytes(device: torch.device | str) -> tuple[int, str] | None:
    """(bytes this device can still allocate, where that number comes from), or None where it is unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free on {device} (torch.cuda.mem_get_info)"
    if device.type != "cpu":
        return None
    found = _meminfo_available()
    limit = _cgroup_available()
    if limit is not None and (found is None or limit < found[0]):
        return limit, "left under this container's memory limit (cgroup memory.max - memory.current)"
    return found


def _meminfo_available() -> tuple[int, str] | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available (MemAvailable in /proc/meminfo)"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(need: int, device: torch.device | str, what: str, advice: str, detail: str = "") -> None:
    """Raise MemoryEstimateError unless `need` bytes fit the memory `device` has available (no check where unknown).
    `what`: the request, e.g. "height=512, width=512, 4 images"; `advice`: what to lower."""
    found = available_bytes(device)
    if found is None or need <= found[0]:
        return
    have, source = found
    estimate = f" (estimate: {detail})" if detail else ""
    raise MemoryEstimateError(f"{what} needs about {format_bytes(need)} of memory{estimate}, but "
                              f"{format_bytes(have)} is {source}: {advice}")
