"""Seeded noise, drawn in one place so that samplers, pipelines and training agree on the order of draws."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


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
