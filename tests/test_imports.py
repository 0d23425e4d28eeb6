"""The import graph of the product packages: imports flow one way, down the layers below, and nothing imports in a
cycle. The graph is read from the source (ast), including imports inside functions, and an import of `a.b.c` counts
as importing the packages `a` and `a.b` too (Python runs their __init__ first)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm", "autoencoder", "pipelines")
# Lowest first. A module may import its own layer's modules (without a cycle) and anything in a lower layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ldm", "ldm.io", "ldm.random"),  # the top package's __init__ (it imports nothing); plumbing
    ("ldm.config",),  # plumbing: YAML <-> dataclasses (writes through ldm.io)
    ("ldm.diffusion", "ldm.networks"),  # the math; the networks
    ("autoencoder",),  # the KL-VAE, built from ldm.networks' blocks
    ("ldm.loading", "ldm.lora"),  # a model's parts, and reading / writing them: diffusers folders, single files, the
    # hub; LoRA files and peft layers (ldm.lora)
    ("ldm.training",),  # every training application and what they share
    ("ldm.shapes",),  # the synthetic world and the bundled model's recipe
    ("pipelines",),  # what a user calls
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The product modules `name` imports (and the packages above them)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in known and candidate != name:
                    found.add(candidate)
    return found


def layer_of(name: str) -> int:
    best, rank = -1, -1
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{name} is in no layer of LAYERS"
    return rank


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    # a module does not depend on its own package's __init__ (Python runs it first, but it only re-exports)
    return {n: {m for m in imports(n, p, known) if not n.startswith(m + ".")} for n, p in mods.items()}


def test_every_import_goes_down_the_layers():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, deps in sorted(graph().items()) for b in sorted(deps) if layer_of(b) > layer_of(a)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_nothing_imports_in_a_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted cycle are both reported."""
    for pkg, files in {"ldm": {"io.py": "import pipelines.x\n", "config.py": "from ldm import random\n",
                               "random.py": "import ldm.config\n", "__init__.py": ""},
                       "autoencoder": {"__init__.py": ""}, "pipelines": {"__init__.py": "", "x.py": ""}}.items():
        (tmp_path / pkg).mkdir()
        for name, text in files.items():
            (tmp_path / pkg / name).write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    g = graph()
    assert g["ldm.io"] == {"pipelines", "pipelines.x"}
    assert "ldm.random" in g["ldm.config"] and "ldm.config" in g["ldm.random"]
    try:
        test_every_import_goes_down_the_layers()
    except AssertionError as e:
        assert "ldm.io (layer 0) imports pipelines (layer 7)" in str(e)
    else:
        raise AssertionError("the planted upward import was not reported")
    try:
        test_nothing_imports_in_a_cycle()
    except AssertionError as e:
        assert "ldm.config -> ldm.random -> ldm.config" in str(e)
    else:
        raise AssertionError("the planted cycle was not reported")


PUBLIC_PACKAGES = ("ldm.diffusion", "ldm.networks", "ldm.loading", "ldm.training", "ldm.shapes", "autoencoder",
                   "pipelines")


def test_every_exported_name_is_its_modules_object_and_no_submodule_is_shadowed():
    import importlib
    import pkgutil

    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        assert module.__all__, f"{package} exports nothing"
        submodules = {m.name for m in pkgutil.iter_modules(module.__path__)}
        assert not submodules & set(module.__all__), f"{package} exports a submodule's name"
        for name in module.__all__:
            value = getattr(module, name)
            home = getattr(value, "__module__", None) or ""
            if home.split(".")[0] in PACKAGES and not isinstance(value, type(module)):
                defining = importlib.import_module(home)
                assert getattr(defining, name, None) is value, f"{package}.{name} is not {home}.{name}"
                # a lazy export is an import too: it must not reach up the layers either
                assert layer_of(home) <= layer_of(package), f"{package}.{name} comes from {home}, a higher layer"


def test_importing_the_cli_or_a_package_loads_no_heavy_module():
    """`ldm --help` stays instant: the package __init__ files export lazily (ldm.lazy)."""
    import subprocess
    import sys

    code = ("import sys, pipelines.cli, ldm.diffusion, ldm.networks, ldm.loading, ldm.training, ldm.shapes, autoencoder; "
            "print(sorted(m for m in ('torch', 'transformers', 'accelerate', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_exports_refuse_a_name_exported_twice_and_an_unknown_name():
    import pytest

    from ldm.lazy import lazy_exports

    with pytest.raises(ValueError, match="'x' is exported by both"):
        lazy_exports("pkg", {"a": ("x",), "b": ("x",)})
    import ldm.shapes  # noqa: F401 - the package whose submodules the next call checks against

    with pytest.raises(ValueError, match="'detect' is both an exported name and a submodule"):
        lazy_exports("ldm.shapes", {"detect": ("detect",)})
    import pipelines

    with pytest.raises(AttributeError, match="module 'pipelines' has no attribute 'Pipelin'"):
        pipelines.Pipelin  # noqa: B018
