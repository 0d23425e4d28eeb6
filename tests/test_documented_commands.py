"""Every command the docs and config headers quote names something that exists: each `python -m MODULE` module, each
`python -c "from X import Y; ..."` import, each `--config FILE` and each `ldm SUBCOMMAND`. Module paths move with
the code; this catches a quoted command left behind."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "ldm" / "configs").glob("*.yaml")),
        *sorted((ROOT / "benchmarks").rglob("README.md"))]
SUBCOMMANDS = {"generate", "convert", "info", "train", "export"}


def quoted(pattern: str) -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        if path.name == "default-model-research.md":  # the lab log records commands as they were run
            continue
        found += [(path.relative_to(ROOT).as_posix(), m) for m in re.findall(pattern, path.read_text())]
    return sorted(set(found))


@pytest.mark.parametrize("where,module", quoted(r"python3? -m ((?:ldm|pipelines|autoencoder|benchmarks)[\w.]*)"))
def test_quoted_module_exists(where, module):
    assert importlib.util.find_spec(module) is not None, f"{where} runs `python -m {module}`, which does not exist"


@pytest.mark.parametrize("where,statement", quoted(r"python -c \"(from [\w.]+ import [\w, ]+);"))
def test_quoted_one_liner_imports(where, statement):
    module, names = re.fullmatch(r"from ([\w.]+) import ([\w, ]+)", statement).groups()
    imported = importlib.import_module(module)
    for name in names.split(","):
        assert hasattr(imported, name.strip()), f"{where}: `{statement}`: {module} has no {name.strip()}"


@pytest.mark.parametrize("where,config", quoted(r"--config ([\w./-]+\.yaml)"))
def test_quoted_config_exists(where, config):
    """A path from the repository root, or a bare name that finds a bundled config (ldm.config.config_path)."""
    from ldm.config import config_path

    assert (ROOT / config).is_file() or config_path(config).is_file(), f"{where}: --config {config} does not exist"


@pytest.mark.parametrize("where,sub", quoted(r"(?m)^\s*(?:#\s*)?ldm (\w+) "))
def test_quoted_ldm_subcommand_exists(where, sub):
    assert sub in SUBCOMMANDS, f"{where} runs `ldm {sub}`, not a subcommand of the CLI"


def test_subcommands_are_the_clis():
    from pipelines.cli import build_parser

    actions = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert set(actions[0].choices) == SUBCOMMANDS


def test_the_patterns_find_commands():
    """The checks above see the commands they are meant to (a pattern that matched nothing would pass silently)."""
    assert ("README.md", "ldm.shapes.recipe") in quoted(r"python3? -m ((?:ldm|pipelines|autoencoder|benchmarks)[\w.]*)")
    assert any(m == "from ldm.shapes.dataset import export_imagefolder" for _, m in
               quoted(r"python -c \"(from [\w.]+ import [\w, ]+);"))
    assert len(quoted(r"--config ([\w./-]+\.yaml)")) >= 4
    assert len(quoted(r"(?m)^\s*(?:#\s*)?ldm (\w+) ")) >= 5


def test_the_readmes_math_snippet_runs_and_prints():
    """The README's 'diffusion math on its own' block runs as written and prints its check."""
    import contextlib
    import io

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    math_blocks = [b for b in blocks if "from ldm.diffusion import" in b]
    assert len(math_blocks) == 1
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(math_blocks[0], "README.md", "exec"), {})  # noqa: S102 - our own README
    assert "tensor(" in out.getvalue()


def dotted_names() -> list[tuple[str, str]]:
    """Every backticked `ldm.…` / `pipelines.…` / `autoencoder.…` name in the docs (the research log aside)."""
    return quoted(r"`((?:ldm|pipelines|autoencoder)(?:\.\w+)+)")


@pytest.mark.parametrize("where,name", dotted_names())
def test_quoted_dotted_name_exists(where, name):
    """A module path or an object in one (ldm.loading.components.save_pipeline) that the docs name must exist."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"{where} names `{name}`: {'.'.join(parts[:i])} has no {attr}"
            obj = getattr(obj, attr)
        return
    raise AssertionError(f"{where} names `{name}`, which is no module")


def test_the_dotted_name_pattern_finds_names():
    assert ("docs/CONVENTIONS.md", "ldm.config.config_path") in dotted_names() and len(dotted_names()) > 20
