"""A run's hold on its output_dir: one run at a time (the lock), stale locks replaced, a killed writer's temporaries
removed on start and resume (issue 31)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from ldm.training import run_folder
from ldm.training.run_folder import LOCK_NAME, RunLockedError, acquire, hold_run_folder, release, remove_temporaries
from ldm.training.unet import train
from tests._helpers import tiny_config


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant_lock(folder, pid: int, host: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"pid": pid, "host": host or socket.gethostname(), "started": time.time() - 60, "argv": ["ldm", "train"]}
    (folder / LOCK_NAME).write_text(json.dumps(owner))


def test_a_live_owner_refuses_a_second_run_and_names_itself(tmp_path):
    _plant_lock(tmp_path, os.getppid())  # a live process of this host
    with pytest.raises(RunLockedError, match=rf"another run is training into .*pid {os.getppid()} on "):
        acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getppid()  # untouched


def test_a_lock_of_this_process_or_another_host_is_refused(tmp_path):
    lock = acquire(tmp_path)
    with pytest.raises(RunLockedError, match="already being trained into by this process"):
        acquire(tmp_path)
    release(lock)
    assert not lock.exists()
    _plant_lock(tmp_path, 1, host="some-other-machine")
    with pytest.raises(RunLockedError, match=f"if that run is no longer running, delete {tmp_path / LOCK_NAME}"):
        acquire(tmp_path)


def test_a_stale_lock_is_replaced_with_a_warning(tmp_path):
    dead = _dead_pid()
    _plant_lock(tmp_path, dead)
    with pytest.warns(UserWarning, match=f"stale run lock.*pid {dead}"):
        lock = acquire(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    (tmp_path / LOCK_NAME).write_text("{trunc")  # a run killed while writing its lock: no owner to protect
    release(lock)  # not ours any more: left alone
    assert lock.exists()
    with pytest.warns(UserWarning, match="stale"):
        release(acquire(tmp_path))
    assert not lock.exists()


def test_only_our_temporaries_are_removed(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / ".step-00000004.ab12cd_3.tmp").mkdir(parents=True)
    (ckpt / ".step-00000004.ab12cd_3.tmp" / "unet.safetensors").write_bytes(b"half")
    (tmp_path / ".frozen.q1w2e3r4.tmp").mkdir()
    (tmp_path / ".losses.csv.zz99yy88.tmp").write_text("step\n")
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden", ckpt / ".step-00000002.short.tmp", tmp_path / "data" /
            ".x.abcdefgh.tmp"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("user's")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".frozen.q1w2e3r4.tmp", ".losses.csv.zz99yy88.tmp",
                                               ".step-00000004.ab12cd_3.tmp"]
    assert all(p.read_text() == "user's" for p in keep)


def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with hold_run_folder(tmp_path):
        assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(KeyError):
        with hold_run_folder(tmp_path):
            assert (tmp_path / LOCK_NAME).exists()
            raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()  # released on an exception too


def test_a_second_training_into_a_held_folder_is_refused_before_writing(shapes, tmp_path):
    out = tmp_path / "run"
    _plant_lock(out, os.getppid())
    (out / "mine.txt").write_text("user's file")
    with pytest.raises(RunLockedError, match="another run is training into"):
        train(tiny_config(shapes, out))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "mine.txt"]  # nothing written, nothing removed


@pytest.mark.slow
def test_resume_removes_a_killed_writers_temporaries_and_says_so(shapes, tmp_path, capfd, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(shapes, out, "run.max_steps=2"))
    half = out / "checkpoints" / ".step-00000004.k1ll3d_x.tmp"
    half.mkdir()
    (half / "unet.safetensors").write_bytes(b"half a checkpoint")
    (out / ".frozen.a1b2c3d4.tmp").mkdir()
    _plant_lock(out, _dead_pid())  # the killed run's lock
    monkeypatch.setattr(run_folder.warnings, "warn", lambda *a, **k: None)
    train(tiny_config(shapes, out, "run.resume=latest", "run.max_steps=4"))
    err = capfd.readouterr().err
    assert "removed 2 temporary file(s) a killed run left" in err and ".step-00000004.k1ll3d_x.tmp" in err
    leftovers = [p for d in (out, out / "checkpoints") for p in d.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == [] and not (out / LOCK_NAME).exists()
    assert (out / "checkpoints" / "step-00000004" / "meta.json").is_file()
    shutil.rmtree(out)
