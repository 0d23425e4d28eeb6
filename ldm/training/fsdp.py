"""Fully sharded data parallel training (FSDP2: torch's `fully_shard`, Zhao et al. 2023) through accelerate, for the
full fine-tune and for LoRA, with checkpoints that hold full (unsharded) tensors.

Start it with `accelerate launch --multi_gpu --use_fsdp --fsdp_version 2 --num_processes N -m ldm.training.unet ...`
(or an accelerate config saying so): accelerate's prepare shards every prepared model (its trainable and frozen
parameters become DTensors split along dim 0), its gradients and its optimizer state over the processes. accelerate
1.16 takes FSDP only on accelerators; on a CPU-only machine (gloo) it silently falls back to DDP, so
`use_fsdp_on_cpu` sets its distributed type to FSDP itself (torch's fully_shard runs on CPU with gloo).

Checkpoints stay those of ldm.training.checkpoint: every process takes part in gathering each sharded tensor
(DTensor.full_tensor), process 0 keeps the full copies and writes them, so a checkpoint reads the same whatever the
number of processes and with or without FSDP. On resume every process reads the full tensors and keeps its shard
(distribute_tensor with src_data_rank=None: no communication). The EMA's shadow copies are sharded like the
parameters they follow.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ldm.config import ConfigError


def fsdp_requested(env: Mapping[str, str] = os.environ) -> bool:
    """True when accelerate was launched with --use_fsdp (or an accelerate config with FSDP)."""
    return env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_plugin() -> Any:
    """accelerate's FSDP plugin from the launcher's environment (FSDP_* variables); only FSDP2 is supported, and full
    state dicts (ldm.training.checkpoint writes full tensors)."""
    from accelerate import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(state_dict_type="FULL_STATE_DICT")
    if plugin.fsdp_version != 2:
        raise ConfigError(f"FSDP version {plugin.fsdp_version} is not supported: launch with --fsdp_version 2 "
                          "(torch's fully_shard)")
    return plugin


def use_fsdp_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Make a multi-process CPU (gloo) accelerator shard with FSDP2, which accelerate 1.16 only selects on GPUs."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(modules: Iterable[nn.Module]) -> bool:
    """True when any parameter of `modules` is a DTensor (the model was prepared with FSDP2)."""
    dtensor = _dtensor()
    return any(isinstance(p, dtensor) for m in modules for p in m.parameters())


def full(value: Any) -> Any:
    """A DTensor gathered into a plain CPU tensor (a collective: every process calls it); anything else unchanged."""
    if isinstance(value, _dtensor()):
        return value.full_tensor().cpu()
    return value


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a full tensor every process holds) as a DTensor sharded as `like`; `value` itself if `like` is plain."""
    if not isinstance(like, _dtensor()):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_ema(ema: Any, module: nn.Module) -> None:
    """Shard an EMA's shadow copies like the (sharded) parameters of `module` they follow."""
    params = dict(module.named_parameters())
    ema.shadow = [shard_like(s, params[name]) for name, s in zip(ema.names, ema.shadow, strict=True)]


class FullModule:
    """A sharded module as ldm.training.checkpoint sees it: load_state_dict takes full tensors (each process keeps
    its shard); state_dict gives the module's own (shapes are the full ones)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        own = self.module.state_dict()
        if strict and own.keys() != state.keys():
            raise KeyError(f"state keys differ: {sorted(own.keys() ^ state.keys())[:5]}")
        for key, target in own.items():
            target.copy_(shard_like(state[key], target))


class FullOptimizer:
    """A sharded model's optimizer as ldm.training.checkpoint sees it: full state in, each process keeps its shard."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's AcceleratedOptimizer wraps it
        for group in inner.param_groups:
            for p in group["params"]:
                slots = inner.state.get(p, {})
                for k, v in slots.items():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        slots[k] = shard_like(v, p)


class FullEMA:
    """A sharded EMA as ldm.training.checkpoint sees it: loading takes full tensors and keeps each shard."""

    def __init__(self, ema: Any, module: nn.Module) -> None:
        self.ema, self.module = ema, module

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        params = dict(self.module.named_parameters())
        self.ema.load_state_dict({**state, "weights": {
            n: shard_like(v, params[n]) if n in params else v for n, v in weights.items()}})


class Snapshot:
    """Full tensors of a module / optimizer / EMA gathered for a checkpoint (held by process 0 only)."""

    def __init__(self, state: Any = None, counters: dict[str, Any] | None = None) -> None:
        self._state, self._counters = state, counters or {}

    def state_dict(self) -> Any:
        return self._state

    def tensors(self) -> Any:
        return self._state

    def counters(self) -> dict[str, Any]:
        return self._counters


def _gather(tree: Any, keep: bool) -> Any:
    """`tree` (dicts / lists of tensors) with every DTensor gathered (collective); None where keep is False."""
    if isinstance(tree, dict):
        out = {k: _gather(v, keep) for k, v in tree.items()}
    elif isinstance(tree, (list, tuple)):
        out = type(tree)(_gather(v, keep) for v in tree)
    else:
        out = full(tree)
    return out if keep else None


def checkpoint_targets(raw: dict[str, nn.Module], parts: list[Any]) -> tuple[dict, dict, dict]:
    """(models, emas, optimizers) for ldm.training.checkpoint.load_checkpoint: the objects themselves, or their
    full-state views when the models are sharded (FSDP)."""
    emas = {p.name: p.ema for p in parts}
    optimizers = {p.name: p.optimizer for p in parts}
    if not is_sharded(raw.values()):
        return raw, emas, optimizers
    return ({n: FullModule(m) for n, m in raw.items()},
            {p.name: FullEMA(p.ema, raw[p.name]) if p.ema is not None else None for p in parts},
            {p.name: FullOptimizer(p.optimizer) for p in parts})


def checkpoint_state(raw: dict[str, nn.Module], parts: list[Any], keep: bool) -> tuple[dict, dict, dict]:
    """(models, emas, optimizers) for ldm.training.checkpoint.save_checkpoint: the objects themselves, or (FSDP) their
    full tensors gathered by every process (a collective) and kept where `keep` (process 0)."""
    emas = {p.name: p.ema for p in parts}
    optimizers = {p.name: p.optimizer for p in parts}
    if not is_sharded(raw.values()):
        return raw, emas, optimizers
    models = {n: Snapshot(_gather(m.state_dict(), keep)) for n, m in raw.items()}
    emas = {p.name: Snapshot(_gather(p.ema.tensors(), keep), p.ema.counters()) if p.ema is not None else None
            for p in parts}
    optimizers = {p.name: Snapshot(_gather(p.optimizer.state_dict(), keep)) for p in parts}
    return models, emas, optimizers


def reshard(modules: Iterable[nn.Module]) -> None:
    """Put every FSDP2 unit of `modules` back in its sharded state: after a forward pass without backward (validation)
    the root unit keeps its gathered parameters, which an EMA swap must not see."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()
