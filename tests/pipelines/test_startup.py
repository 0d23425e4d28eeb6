"""Start-up of `ldm generate` (issue 32): generating from a folder or a single file imports none of the large
libraries the project uses elsewhere, and the console script leaves without the interpreter's teardown once its
image is written, while main() called from Python returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# imported on other paths only: training (accelerate, datasets), single files and seeded tiny models (transformers),
# writing folders (diffusers), the CLIP stage (open_clip); none is needed to generate from a folder
HEAVY = ("transformers", "diffusers", "open_clip", "datasets", "accelerate", "scipy", "matplotlib")


def _generate_in_fresh_interpreter(argv: list[str], watched: tuple[str, ...]) -> list[str]:
    """Run pipelines.cli.main(argv) in a new interpreter; the modules of `watched` it imported."""
    code = (f"import json, sys; from pipelines.cli import main; code = main({argv!r}); "
            f"print(json.dumps({{'code': code, 'loaded': sorted(m for m in {watched!r} if m in sys.modules)}}))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, run.stderr
    return result["loaded"]


@pytest.mark.parametrize("source", ["bundled folder", "single file"])
def test_generating_imports_no_heavy_library(source, tmp_path):
    """`ldm generate` on the bundled model, and on it as a single .safetensors file, in a fresh interpreter."""
    from ldm.loading.sources import DEFAULT_MODEL
    from pipelines.cli import main

    model: list[str] = []
    if source == "single file":
        assert main(["convert", str(DEFAULT_MODEL), str(tmp_path / "model.safetensors")]) == 0
        model = ["--model", str(tmp_path / "model.safetensors")]
    out = tmp_path / "x.png"
    argv = ["generate", "a red circle", "-o", str(out), "--steps", "1", "--no-progress", *model]
    assert _generate_in_fresh_interpreter(argv, HEAVY) == []
    assert out.is_file()


def test_generating_does_not_load_torchs_compiler(tmp_path):
    """torch._dynamo (with sympy: ~1 s) is torch.compile's; a @torch.compiler.disable run at import time, or
    random initialisation on the meta device (torch._refs), loads it too."""
    argv = ["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--steps", "1", "--no-progress"]
    assert _generate_in_fresh_interpreter(argv, ("torch._dynamo", "sympy")) == []


def _sentinel_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreter prints TEARDOWN to stderr when it frees its modules at exit."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import sys\n\nclass _Sentinel:\n    def __del__(self):\n        sys.__stderr__.write('TEARDOWN\\n')\n\n"
        "_sentinel = _Sentinel()\n")
    path = os.pathsep.join(p for p in (str(tmp_path / "site"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def test_console_script_generate_exits_without_teardown(tmp_path):
    """`ldm generate` (and python -m pipelines.cli generate) skip the teardown after writing and flushing; other
    commands and refused arguments exit normally."""
    from PIL import Image

    exe = Path(sys.executable).with_name("ldm")
    if not exe.exists():
        pytest.skip(f"the console script is not installed beside {sys.executable} (pip install -e .)")
    env = _sentinel_env(tmp_path)
    for i, command in enumerate(([str(exe)], [sys.executable, "-m", "pipelines.cli"])):
        out = tmp_path / f"x{i}.png"
        run = subprocess.run([*command, "generate", "a red circle", "-o", str(out), "--steps", "1", "--seed", "3",
                              "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        assert run.stdout == f"wrote {out} (seed 3)\n"  # stdout is a pipe here: flushed before the exit
        assert "TEARDOWN" not in run.stderr
        with Image.open(out) as im:
            im.load()  # the whole file is there
    refused = subprocess.run([str(exe), "generate", "a", "--steps", "0"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--steps must be an integer in [1, 1000], got 0" in refused.stderr
    helped = subprocess.run([str(exe), "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "TEARDOWN" in helped.stderr  # not a generate run: the normal exit
