"""Seeded noise, drawn in one place so that samplers, pipelines and training agree on the order of draws."""

from __future__ import annotations

import operator
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

Generator = torch.Generator | Sequence[torch.Generator] | None
SEED_SPACE = 2**64  # seeds are integers in [0, 2**64), a torch generator's seed range


def check_seed(seed: object, name: str = "seed") -> int:
    """`seed` as an int in [0, 2**64); a bool, a float, a string or a value outside the range is a ValueError naming
    it (a string is not read digit by digit as a list of seeds)."""
    if isinstance(seed, bool) or isinstance(seed, (str, bytes)):
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {seed!r}")
    try:
        value = operator.index(seed)  # ints and numpy integers, not floats
    except TypeError:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {seed!r} ({type(seed).__name__})") from None
    if not 0 <= value < SEED_SPACE:
        raise ValueError(f"{name} must be an integer in [0, 2**64), got {value}")
    return value


def cpu_generator(seed: int) -> torch.Generator:
    """A CPU generator drawing seed's own noise for every seed in [0, 2**64).

    Below 2**32 it is `torch.Generator().manual_seed(seed)`, the generator diffusers and every SD tool seed, so a seed
    gives their image. torch's CPU generator (mt19937) keeps only 32 bits of a larger seed (0 and 2**32 would draw
    the same noise), so above 2**32 its state is mt19937's `init_by_array` of the seed's two 32-bit halves (the
    reference generator's seeding for long keys, as Python's random and numpy do): a distinct stream per 64-bit seed.
    """
    seed = check_seed(seed)
    g = torch.Generator("cpu").manual_seed(seed)
    if seed < 2**32:
        return g
    key = np.random.RandomState(np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint32)).get_state()[1]
    state = bytearray(g.get_state().numpy().tobytes())
    # torch's CPU generator state: u64 initial seed, i32 left, i32 seeded, u64 next, then the 624 mt19937 words as u64
    initial, left, seeded, nxt = struct.unpack_from("<QiiQ", state, 0)
    if (initial, left, seeded, nxt) != (seed, 1, 1, 0) or len(state) < 24 + 624 * 8:
        raise RuntimeError("this torch's CPU generator state layout is not the one cpu_generator knows")
    struct.pack_into("<624Q", state, 24, *(int(w) for w in key))
    g.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    return g


def randn(
    shape: Sequence[int],
    generator: Generator = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of `shape`.

    With a list of generators, item i of the batch is drawn from generator i alone, so an image's noise does not
    depend on the batch it is in. Noise is drawn on the generator's device and moved, so CPU seeds give the same
    numbers on every device.
    """
    shape = tuple(shape)
    if isinstance(generator, Sequence) and not isinstance(generator, torch.Generator):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device=device, dtype=dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return x.to(device) if device is not None else x


def randn_like(x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
    """Standard normal noise shaped like `x`, on its device and dtype."""
    return randn(x.shape, generator, device=x.device, dtype=x.dtype)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global torch CPU RNG seeded by `seed` (e.g. a model's random init), then put the caller's
    RNG state back, so seeded construction neither depends on nor disturbs the surrounding draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
