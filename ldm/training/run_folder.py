"""A training run's hold on its output_dir: one run at a time (a lock file naming its owner), and the temporary files
that a killed writer of ours left there removed before the run writes anything.

The lock is `<output_dir>/.ldm-run.lock`, created with O_EXCL (atomic on local and NFS v3+ filesystems) by the main
process (RANK 0, or the only process), holding {"pid", "host", "started", "argv"} as JSON. A second run into the folder is
refused with the owner named. A lock whose owner is gone (same host, no such process: the run was killed) is stale:
it is replaced, and the log says so. A lock from another host cannot be checked from here: it is refused, and the
message says which file to delete if that run is dead. The lock goes when the run ends, normally or by an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from ldm.io import pid_alive

LOCK_NAME = ".ldm-run.lock"
# what ldm.io's atomic writers name their temporaries: mkstemp / mkdtemp with prefix ".<name>." and suffix ".tmp"
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
OUR_FOLDERS = (".", "checkpoints", "validation")  # where a run of ours writes: the run folder and two of its own


class RunLockedError(FileExistsError):
    """Another run holds the output_dir."""


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # half-written by a run killed in the middle of taking it: no owner to protect


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {when}"


def acquire(output_dir: str | Path) -> Path:
    """Take the run lock of `output_dir` (created if missing); raise RunLockedError if a live run holds it."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
    for _ in range(3):  # a stale lock removed by two runs at once: one of them wins the next O_EXCL
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(lock)
            pid, host = owner.get("pid"), owner.get("host")
            mine = host == me["host"] and isinstance(pid, int)
            if mine and pid == me["pid"]:
                raise RunLockedError(f"{out} is already being trained into by this process ({lock})") from None
            if owner and (not mine or pid_alive(pid)):
                raise RunLockedError(
                    f"another run is training into {out} ({_describe(owner)}; lock file {lock}): wait for it, or choose "
                    f"another run.output_dir; if that run is no longer running, delete {lock}") from None
            warnings.warn(f"{out}: removing the stale run lock of a run that is gone ({_describe(owner)})",
                          stacklevel=2)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return lock
    raise RunLockedError(f"could not take the run lock {lock}: other runs keep taking it")


def release(lock: Path) -> None:
    """Remove the lock if it is still ours."""
    if _owner(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def remove_temporaries(output_dir: str | Path) -> list[Path]:
    """Remove what a killed writer of ours left in the run's own folders (`.<name>.<8 chars>.tmp` files and folders,
    e.g. a checkpoint `.step-00001000.ab12cd34.tmp/` or `.frozen.x1y2z3w4.tmp/`); return what was removed. Only call
    it holding the run lock: then no writer of ours is at work there."""
    import shutil

    removed = []
    for name in OUR_FOLDERS:
        folder = Path(output_dir) / name
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if TEMPORARY.match(entry.name) and not entry.is_symlink():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def hold_run_folder(output_dir: str | Path) -> Iterator[None]:
    """For the run's duration: the lock (main process only) and, once it is held, the stale temporaries removed with
    a line in the log saying which. Other processes of a multi-process run proceed; if the main process is refused,
    torchrun stops them."""
    if not _is_main():
        yield
        return
    lock = acquire(output_dir)
    try:
        removed = remove_temporaries(output_dir)
        if removed:
            names = ", ".join(str(p.relative_to(output_dir)) for p in removed[:5])
            more = f" and {len(removed) - 5} more" if len(removed) > 5 else ""
            print(f"ldm: removed {len(removed)} temporary file(s) a killed run left in {output_dir}: {names}{more}",
                  file=sys.stderr)
        yield
    finally:
        release(lock)
