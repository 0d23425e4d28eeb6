"""The package works however it is installed: a wheel built from the tracked files, installed outside the repository,
generates with the bundled model, finds its bundled configs by name, builds the tiny model and round-trips a single
file, all with nothing of the repository on the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, tempfile
from pathlib import Path
import ldm, pipelines
where = Path(ldm.__file__).resolve().parents[1]
assert where == Path(sys.argv[1]).resolve(), ("not the installed copy", where)
from ldm.config import config_path, load_yaml
assert load_yaml("train-tiny.yaml")["model"]["unet"] == "unet-tiny.yaml"
for name in ("unet-sd15.yaml", "unet-sd2.yaml", "vae-sd.yaml", "default-model.yaml"):
    assert config_path(name).is_file(), name
from pipelines.tiny import tiny_components
from pipelines import load_single_file, save_single_file
parts = tiny_components()
out = Path(tempfile.mkdtemp()) / "tiny.safetensors"
save_single_file(parts, out)
back = load_single_file(out)
assert all((a == b).all() for a, b in zip(parts.unet.state_dict().values(), back.unet.state_dict().values()))
print("installed ok")
"""


@pytest.mark.slow  # about 30 s: builds a wheel of the tracked files (the bundled model included)
def test_a_wheel_installed_outside_the_repository_works(tmp_path):
    src = tmp_path / "src"
    for name in subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                   check=True, cwd=tmp_path)
    wheel = next((tmp_path / "wheel").glob("ldm-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # before site-packages: the installed copy, not the editable one
    check = subprocess.run([sys.executable, "-c", CHECK, str(site)], cwd=run_dir, env=env, capture_output=True,
                           text=True)
    assert check.returncode == 0 and "installed ok" in check.stdout, check.stdout + check.stderr
    gen = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "a red circle", "-o", "out.png",
                          "--steps", "2", "--seed", "0", "--no-progress"], cwd=run_dir, env=env, capture_output=True,
                         text=True)
    assert gen.returncode == 0 and (run_dir / "out.png").is_file(), gen.stdout + gen.stderr
