"""Timing and peak memory shared by the benchmarks: one call measured at a time, ours and the reference alternated.

Peak memory. CUDA: torch.cuda.max_memory_allocated during the call minus the memory allocated before it. CPU: the
increase of the process's peak resident set size (VmHWM) over its resident size just before the call; the peak is
reset before each call by writing 5 to /proc/self/clear_refs (Linux >= 4.0). So that freed tensors really leave the
resident set (and one call's freed pages do not hide the next call's), `reexec_with_mmap_threshold()` restarts the
script with a fixed glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072: every buffer over 128 KiB is its own mmap,
unmapped on free). This counts what the call makes resident: activations, temporaries and allocator overhead.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def reexec_with_mmap_threshold() -> None:
    """Restart this process with MALLOC_MMAP_THRESHOLD_ set (read by glibc at start), unless set or on CUDA."""
    if sys.platform.startswith("linux") and MMAP_ENV not in os.environ and not any("cuda" in a for a in sys.argv):
        os.environ[MMAP_ENV] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, float, float]:
    """Run `fn` once; return (output, wall seconds, process CPU seconds, peak extra memory in MiB)."""
    c0 = time.process_time()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return out, seconds, time.process_time() - c0, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, seconds, time.process_time() - c0, (status_kib("VmHWM") - base) / 1024


def compare(name: str, ours: Callable, theirs: Callable, reps: int, device: torch.device) -> dict:
    """Alternate ours/theirs `reps` times; medians of time and peak memory, their ratios, max abs output difference."""
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    cpu: dict[str, list[float]] = {"ours": [], "diffusers": []}
    mems: dict[str, list[float]] = {"ours": [], "diffusers": []}
    fns = {"ours": ours, "diffusers": theirs}
    diff = 0.0
    for r in range(reps):
        outs = {}
        for who in (("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")):
            out, sec, cpu_sec, mib = measure(fns[who], device)
            times[who].append(sec)
            cpu[who].append(cpu_sec)
            mems[who].append(mib)
            outs[who] = out.float()
            del out
            print(f"  {name} rep {r + 1}/{reps} {who:9s} {sec:8.3f} s (cpu {cpu_sec:8.3f} s)  peak +{mib:8.1f} MiB", flush=True)
        diff = max(diff, (outs["ours"] - outs["diffusers"]).abs().max().item())
        del outs
    res = {
        "time_s": {k: statistics.median(v) for k, v in times.items()},
        "cpu_time_s": {k: statistics.median(v) for k, v in cpu.items()},
        "peak_mem_mib": {k: statistics.median(v) for k, v in mems.items()},
        "all_times_s": times,
        "all_cpu_times_s": cpu,
        "max_abs_output_diff": diff,
    }
    res["time_ratio"] = res["time_s"]["ours"] / res["time_s"]["diffusers"]
    res["cpu_time_ratio"] = res["cpu_time_s"]["ours"] / res["cpu_time_s"]["diffusers"]
    res["mem_ratio"] = res["peak_mem_mib"]["ours"] / max(res["peak_mem_mib"]["diffusers"], 1e-9)
    return res


def write_report(out_dir: str | Path, stem: str, data: dict, markdown: str, *, echo: bool = True) -> None:
    """Write `<stem>.json` and `<stem>.md` into out_dir, each atomically; `echo`: also print the Markdown."""
    import json

    from ldm.io import write_text

    write_text(json.dumps(data, indent=2) + "\n", Path(out_dir) / f"{stem}.json")
    write_text(markdown.rstrip("\n") + "\n", Path(out_dir) / f"{stem}.md")
    if echo:
        print(markdown)
