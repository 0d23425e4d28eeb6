"""Lazy package exports: a package's __init__ names its public API without importing it, so that importing one module
(or `ldm --help`) does not load torch, transformers and accelerate through a sibling. A name's module is imported on
first use (PEP 562 module __getattr__), the way diffusers and transformers keep their top-level imports cheap."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[list[str], Callable[[str], Any],
                                                                                 Callable[[], list[str]]]:
    """(__all__, __getattr__, __dir__) for `package`, whose submodule `module` defines each name in exports[module]; a
    module written with a dot ("ldm.training.export") is absolute, for a name re-exported from a lower layer."""
    where: dict[str, str] = {}
    package_path = getattr(sys.modules.get(package), "__path__", None)
    submodules = {m.name for m in pkgutil.iter_modules(package_path)} if package_path else set()
    for module, names in exports.items():
        for name in names:
            if name in where:
                raise ValueError(f"{package}: {name!r} is exported by both {where[name]} and {module}")
            if name in submodules:
                raise ValueError(f"{package}: {name!r} is both an exported name and a submodule; `from {package} "
                                 f"import {name}` would give either, depending on what was imported before")
            where[name] = module

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = where[name] if "." in where[name] else f"{package}.{where[name]}"
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(where) | set(vars(sys.modules[package])))

    return sorted(where), __getattr__, __dir__
