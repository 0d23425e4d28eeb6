"""DeepCache (Ma et al. 2023, "DeepCache: Accelerating Diffusion Models for Free"): training-free feature caching for
the U-Net (`UNet.forward(..., cache=FeatureCache(...))`).

The U-Net's up path reads its skip connections in reverse: the up resnet k from the output (k = 0: the last resnet of
the last up block) takes skip k (k = 0: conv_in's output) concatenated with everything computed below it, the *deep
feature*. High-level features change slowly between adjacent denoising steps (the paper's sec. 3.2), so:

- a **full** call runs the whole network and keeps the deep feature of branch `depth`, the input (before the
  concatenation) of up resnet `depth`;
- a **cached** call runs only the shallow path: conv_in and the down layers that make skips 0 .. depth, then up resnets
  depth, depth - 1, ..., 0 fed the kept deep feature in place of the mid block and the deeper up path, then conv_out.

`depth` is DeepCacheSDHelper's `cache_branch_id`: for SD's layout (two resnets per block, so three skips and three up
resnets per block) branch k is its (block k // 3, layer k % 3); other layouts number their up resnets the same way,
0 .. `UNet.cache_branches` - 1. Branch 0 (DeepCache's default for SD 1.5, with interval 3) is the cheapest cached call.

Schedule (DeepCache's "uniform" skip mode): network calls are counted from 0 over the cache's life, and call i is full
when i % interval == 0; so the first is always full and interval 1 never reuses anything. The count is of *network
calls*: one per step for every sampler but heun (two per step; DeepCache's helper instead keys on the position of the
timestep in diffusers' list, whose repeated entries give heun the indices 0, 1, 1, 3, 3, ...), and one per step with
classifier-free guidance too, whose branches share one batched call (the kept feature then holds both). A call whose
input differs in shape, dtype or device from the one that made the kept feature (the guidance interval switching
between the batched 2B call and the conditional B call, an img2img start) is full as well: a feature is never reused on
another batch or size.

A cache lives for one sampling run (the pipeline makes one per call); it holds a reference to one tensor.
"""

from __future__ import annotations

import torch


def _check_int(name: str, value: object, low: int, high: int | None = None, what: str = "") -> int:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high)
    if bad:
        valid = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {valid}{what}, got {value!r}")
    return value


class FeatureCache:
    """The state of DeepCache over one sampling run: the schedule (`interval`, `depth`), the calls counted so far and
    the kept deep feature. `UNet.forward` asks it `lookup` (full or cached?) and, on a full call, `store`s into it."""

    def __init__(self, interval: int = 3, depth: int = 0) -> None:
        self.interval = _check_int("cache_interval", interval, 1, what=" (1: no caching)")
        self.depth = _check_int("cache_depth", depth, 0)
        self.calls = 0  # network calls so far
        self.full_calls = 0
        self._feature: torch.Tensor | None = None
        self._key: tuple | None = None

    def __repr__(self) -> str:
        return (f"FeatureCache(interval={self.interval}, depth={self.depth}, calls={self.calls}, "
                f"full_calls={self.full_calls})")

    def check(self, branches: int) -> FeatureCache:
        """Raise unless `depth` names one of a network's `branches` skip branches (UNet.cache_branches); self."""
        _check_int("cache_depth", self.depth, 0, branches - 1, f" (this U-Net has {branches} skip branches)")
        return self

    @staticmethod
    def _key_of(sample: torch.Tensor, context: torch.Tensor) -> tuple:
        return tuple(sample.shape), tuple(context.shape), sample.dtype, sample.device

    @classmethod
    def exclude_from_compile(cls) -> None:
        """Keep `lookup` and `store` out of torch.compile's graphs (the call count would otherwise recompile the U-Net
        at every call index, and a kept CUDA-graph output be overwritten). Applied by `Pipeline.compile()`; call it
        before compiling a U-Net yourself. Not done at import: torch.compiler.disable imports torch's compiler
        stack (about a second) on every generate."""
        if not getattr(cls, "_excluded", False):
            cls.lookup = torch.compiler.disable(cls.lookup)  # type: ignore[method-assign]
            cls.store = torch.compiler.disable(cls.store)  # type: ignore[method-assign]
            cls._excluded = True

    def lookup(self, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor | None:
        """Count one network call on `sample` / `context`: the kept deep feature if this call may reuse it (a cached
        call), None if it must run in full (its index is a multiple of `interval`, or nothing fits its inputs)."""
        index, self.calls = self.calls, self.calls + 1
        if index % self.interval == 0 or self._feature is None or self._key != self._key_of(sample, context):
            self.full_calls += 1
            self._feature = self._key = None  # a full call replaces it
            return None
        return self._feature

    def store(self, feature: torch.Tensor, sample: torch.Tensor, context: torch.Tensor) -> None:
        """Keep a copy of the deep feature a full call on `sample` / `context` computed, made outside any compiled
        graph: under torch.compile(mode="reduce-overhead") the feature is a CUDA-graph output, which the graph's next
        replay overwrites."""
        self._feature, self._key = feature.clone(), self._key_of(sample, context)
