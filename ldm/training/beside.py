"""Run one function in a second local process beside this one: a recipe stage whose inputs are ready while another
stage trains (ldm.shapes.recipe runs the VAE decoder stage beside the U-Net stage). On a 2-core CPU two 1-thread
processes do more work than one 2-thread process (docs/default-model-research.md, "The time budget"). The function's result
(a JSON-able dict) comes back through a file written atomically, so a crash cannot pass for a result."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ldm.io import write_text


def _child(fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], result: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    info = fn(*args)
    write_text(json.dumps({**info, "wall_s": time.perf_counter() - start}), result)


class Beside:
    """`fn(*args)` in a spawned process on `threads` torch threads; join() returns its dict plus its wall_s."""

    def __init__(self, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], result: str | Path,
                 threads: int = 1) -> None:
        self.name = getattr(fn, "__name__", "function")
        self.result = Path(result)
        self.result.unlink(missing_ok=True)  # a stale result must not be taken for this run's
        self.process = multiprocessing.get_context("spawn").Process(
            target=_child, args=(fn, args, self.result, threads), name=f"beside-{self.name}")
        self.process.start()

    def join(self) -> dict[str, Any]:
        """Wait for the process; its result, or a RuntimeError naming the function and its exit code."""
        self.process.join()
        if self.process.exitcode != 0 or not self.result.is_file():
            raise RuntimeError(f"{self.name} beside this process failed (exit code {self.process.exitcode}); "
                               "its traceback is in this process's stderr")
        return json.loads(self.result.read_text())

    def stop(self) -> None:
        """Terminate the process if it still runs (this process is failing: do not leave it training alone)."""
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
