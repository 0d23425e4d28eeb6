"""LoRA weights into a model as peft layers (`peft.LoraConfig` + `peft.inject_adapter_in_model`, the layers diffusers
loads LoRAs into), checked first: every module must exist and be a Linear or Conv2d whose weight the LoRA fits.

Several named adapters live side by side in the same peft layers, each with its scale (peft's `set_scale`: scaling =
scale * alpha / r); merging (`merge` / `unmerge`) adds scale * (alpha / r) * up @ down into the base weight and takes it
out again. Nothing here is ours but the checks and the bookkeeping: the layers, their forward and the merge are peft's.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn

from ldm.io import WeightsError
from ldm.lora.base import TEXT_MODEL, LoraModule, check_module


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) of the peft LoRA layers in `model`."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _base(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _resolve(own: dict[str, nn.Module], path: str, text: bool) -> str | None:
    """The path among `own` (a model's named modules) of LoRA module `path` (a text model's may sit under
    transformers 4's text_model.)."""
    for candidate in ((path, TEXT_MODEL + path) if text else (path,)):
        if candidate in own and not candidate.endswith(".base_layer"):
            return candidate
    return None


def fitted(key: str, m: LoraModule, layer: nn.Module) -> LoraModule:
    """`m` in the shapes peft gives `layer`'s adapter (a Linear's LoRA stored as 1x1 convolutions is the same map), or
    a WeightsError naming the key and both shapes."""
    name = f"{m.source} ({key})" if m.source else key
    check_module(name, m)
    weight = layer.weight
    if isinstance(layer, nn.Linear):
        if m.down.ndim == 4 and m.down.shape[2:] == (1, 1):
            m = LoraModule(m.down[:, :, 0, 0], m.up[:, :, 0, 0], m.alpha, m.source)
        want_down, want_up = (m.rank, weight.shape[1]), (weight.shape[0], m.rank)
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise WeightsError(f"LoRA {name}: the layer is a grouped convolution, which LoRA does not adapt")
        if m.down.ndim == 2 and weight.shape[2:] == (1, 1):
            m = LoraModule(m.down[:, :, None, None], m.up[:, :, None, None], m.alpha, m.source)
        want_down, want_up = (m.rank, *weight.shape[1:]), (weight.shape[0], m.rank, 1, 1)
    else:
        raise WeightsError(f"LoRA {name}: the module is a {type(layer).__name__}; a LoRA adapts Linear and Conv2d "
                           "layers only")
    if tuple(m.down.shape) != tuple(want_down) or tuple(m.up.shape) != tuple(want_up):
        raise WeightsError(f"LoRA {name}: down {tuple(m.down.shape)} / up {tuple(m.up.shape)} do not fit the layer's "
                           f"weight {tuple(weight.shape)}: expected down {tuple(want_down)} / up {tuple(want_up)}")
    return m


def check_fits(model: nn.Module, modules: dict[str, LoraModule], *, prefix: str) -> dict[str, LoraModule]:
    """{path in `model`: LoraModule in peft's shapes} for `modules` ({module path: LoraModule}); a module that is not
    in `model`, or that the LoRA does not fit, is a WeightsError naming the key (and the file's name for it)."""
    text = prefix.startswith("text_encoder")
    out: dict[str, LoraModule] = {}
    own = dict(model.named_modules())
    for path, m in modules.items():
        found = _resolve(own, path, text)
        key = f"{prefix}.{path}"
        if found is None:
            named = f"{m.source!r} ({key})" if m.source else repr(key)
            raise WeightsError(f"LoRA module {named} matches no module of the {prefix} ({type(model).__name__})")
        out[found] = fitted(key, m, _base(own[found]))
    return out


def inject(model: nn.Module, modules: dict[str, LoraModule], adapter: str, *, prefix: str) -> None:
    """Add adapter `adapter` to `model` as peft LoRA layers holding `modules` ({module path: LoraModule}; checked by
    `check_fits` before anything changes), in the dtype and on the device of each layer's weight."""
    import peft

    fits = check_fits(model, modules, prefix=prefix)
    if any(adapter in layer.lora_A for _, layer in lora_layers(model)):
        raise ValueError(f"the {prefix} already holds a LoRA adapter named {adapter!r}")
    r = Counter(m.rank for m in fits.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in fits.values()).most_common(1)[0][0]
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules="|".join(re.escape(p) for p in fits),
        rank_pattern={f"^{re.escape(p)}": m.rank for p, m in fits.items() if m.rank != r},
        alpha_pattern={f"^{re.escape(p)}": m.alpha for p, m in fits.items() if m.alpha != alpha},
    )  # fmt: skip
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # a second adapter beside the first is what is meant here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        peft.inject_adapter_in_model(config, model, adapter_name=adapter)
    for name, p in model.named_parameters():  # peft marks the adapter trainable and the rest frozen: undo that
        p.requires_grad_(grads.get(name.replace(".base_layer", ""), False))
    with torch.no_grad():
        for path, m in fits.items():
            layer = model.get_submodule(path)
            if adapter not in getattr(layer, "lora_A", {}):
                raise RuntimeError(f"peft did not adapt {prefix}.{path}")
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            a.copy_(m.down.to(a.dtype))
            b.copy_(m.up.to(b.dtype))
            if layer.lora_alpha[adapter] != m.alpha or layer.r[adapter] != m.rank:
                raise RuntimeError(f"peft gave {prefix}.{path} rank {layer.r[adapter]}, alpha "
                                   f"{layer.lora_alpha[adapter]} where the LoRA has {m.rank}, {m.alpha}")


def activate(model: nn.Module, scales: dict[str, float]) -> None:
    """Make the adapters of `scales` the active ones of every LoRA layer in `model`, each at its scale."""
    for _, layer in lora_layers(model):
        layer.set_adapter(list(scales), inference_mode=True)
        for name, scale in scales.items():
            layer.set_scale(name, scale)


def merge(model: nn.Module, adapters: list[str]) -> None:
    """Add each adapter's scale * (alpha / r) * up @ down into its layers' base weights (peft's merge)."""
    for _, layer in lora_layers(model):
        names = [a for a in adapters if a in layer.lora_A]
        if names:
            layer.merge(adapter_names=names)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again (peft's unmerge, within float rounding)."""
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()


def remove(model: nn.Module, adapter: str) -> None:
    """Delete adapter `adapter` from every layer (unmerged); a layer left without adapters becomes its base layer."""
    empty = []
    for name, layer in lora_layers(model):
        if adapter in layer.lora_A:
            layer.delete_adapter(adapter)
        if not layer.lora_A:
            empty.append(name)
    for name in empty:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _base(model.get_submodule(name)))
    configs = getattr(model, "peft_config", None)  # what inject_adapter_in_model noted on the model
    if isinstance(configs, dict):
        configs.pop(adapter, None)
        if not configs:
            del model.peft_config


def unwrap(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Put each LoRA layer's base layer in its place (its weights: merged ones where merged); returns (owner, name,
    LoRA layer) to put back with setattr."""
    swapped = []
    for name, layer in list(lora_layers(model)):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _base(layer))
        swapped.append((owner, child, layer))
    return swapped
