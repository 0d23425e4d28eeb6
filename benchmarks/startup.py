"""Time to first image: `ldm generate` on the bundled model against the equivalent diffusers script, each a fresh
process timed whole (start-up, imports, loading, sampling, saving the PNG, exit).

The diffusers script loads the same folder (pipelines/default_model is a diffusers StableDiffusionPipeline folder)
with StableDiffusionPipeline.from_pretrained, samples with DPMSolverMultistepScheduler (2nd-order DPM-Solver++, our
dpmpp_2m, named on our command line) at the same steps, guidance 7.5 and seed, and saves a PNG. The commands run in
turn, the order rotated each repetition so load drift hits all, after one untimed warm-up each (the files are in the
page cache); medians of wall time, CPU time (user + sys, as the OS accounted it to the process) and peak resident
memory, and the ratio to diffusers.
`--tree LABEL=DIR` adds `ldm generate` run from another checkout (e.g. the commit before a change).

    python benchmarks/startup.py [--reps 7] [--steps 30] [--threads N] [--tree before=/path/to/checkout]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "pipelines" / "default_model"
PROMPT = "a red circle"

DIFFUSERS_SCRIPT = """
import sys
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

folder, prompt, steps, seed, out, threads = sys.argv[1:7]
if threads != "default":
    torch.set_num_threads(int(threads))
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
generator = torch.Generator("cpu").manual_seed(int(seed))
image = pipe(prompt, num_inference_steps=int(steps), guidance_scale=7.5, generator=generator).images[0]
image.save(out)
print(f"wrote {out}")
"""


def commands(out_dir: Path, steps: int, seed: int, threads: int | None,
             trees: dict[str, Path] | None = None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """name -> (argv, environment): ours from this checkout, each extra tree's, diffusers' script."""
    ldm = Path(sys.executable).with_name("ldm")
    base = [str(ldm)] if ldm.exists() else [sys.executable, "-m", "pipelines.cli"]
    extra = ["--threads", str(threads)] if threads else []
    found: dict[str, tuple[list[str], dict[str, str]]] = {}
    for name, tree in {"ldm generate": ROOT, **(trees or {})}.items():
        label = name if name == "ldm generate" else f"ldm generate ({name})"
        argv = [*base, "generate", PROMPT, "-o", str(out_dir / f"{len(found)}.png"), "--model", str(BUNDLED),
                "--steps", str(steps), "--sampler", "dpmpp_2m", "--guidance", "7.5", "--seed", str(seed),
                "--no-progress", *extra]
        found[label] = (argv, {"PYTHONPATH": str(tree)})  # the console script imports pipelines.cli from `tree`
    script = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(BUNDLED), PROMPT, str(steps), str(seed),
              str(out_dir / "diffusers.png"), str(threads or "default")]
    found["diffusers script"] = (script, {})
    return found


def run_once(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """One fresh process: wall seconds, and the CPU seconds (user + sys) and peak RSS (MiB) the OS accounted to it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with proc.stderr as stream:  # type: ignore[union-attr]
        err = stream.read()  # until the child exits
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}:\n{err.decode()[-2000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def time_to_first_image(reps: int = 7, steps: int = 30, seed: int = 0, threads: int | None = None,
                        trees: dict[str, Path] | None = None, echo: bool = True) -> dict:
    """Time each command `reps` times in rotated order after one warm-up each; medians, runs and ratios to diffusers."""
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(Path(tmp), steps, seed, threads, trees)
        names = list(cmds)
        for name in names:  # warm-up: page cache, .pyc files
            run_once(*cmds[name])
        for r in range(reps):
            for name in names[r % len(names):] + names[: r % len(names)]:
                result = run_once(*cmds[name])
                runs.setdefault(name, []).append(result)
                if echo:
                    print(f"  rep {r + 1}/{reps} {name:32s} {result['wall_s']:6.2f} s wall, {result['cpu_s']:6.2f} s "
                          f"cpu, {result['peak_mib']:7.1f} MiB", flush=True)
    medians = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in runs.items()}
    ref = medians["diffusers script"]
    ratios = {n: {k: m[k] / ref[k] for k in m} for n, m in medians.items()}
    return {"steps": steps, "seed": seed, "threads": threads, "reps": reps, "cpus": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()), "medians": medians, "ratio_to_diffusers": ratios,
            "runs": runs, "commands": {n: " ".join(a if " " not in a and "\n" not in a else repr(a[:40] + "...")
                                                   for a in argv) for n, (argv, _) in cmds.items()}}


def report(data: dict) -> str:
    lines = [f"# Time to first image: `ldm generate` vs diffusers (bundled model, {data['steps']} steps, "
             f"{data['cpus']} CPUs, threads: {data['threads'] or 'torch default'})", "",
             f"Each command a fresh process timed whole, {data['reps']} runs in rotated order after a warm-up; "
             f"medians (min-max of wall). Load average at the end: {data['load_average_at_end'][0]:.2f}.", "",
             "| command | wall s | wall min-max | cpu s | peak MiB | wall vs diffusers | cpu vs diffusers |",
             "|---|---|---|---|---|---|---|"]
    for name, m in data["medians"].items():
        walls = [r["wall_s"] for r in data["runs"][name]]
        ratio = data["ratio_to_diffusers"][name]
        lines.append(f"| {name} | {m['wall_s']:.2f} | {min(walls):.2f}-{max(walls):.2f} | {m['cpu_s']:.2f} | "
                     f"{m['peak_mib']:.0f} | {ratio['wall_s']:.2f}x | {ratio['cpu_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every command (default: torch's)")
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR",
                    help="also time `ldm generate` from another checkout of this repository")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    trees = {}
    for item in args.tree:
        label, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "pipelines" / "cli.py").is_file():
            ap.error(f"--tree {item}: want LABEL=DIR, DIR a checkout of this repository")
        trees[label] = Path(folder).resolve()
    data = time_to_first_image(args.reps, args.steps, args.seed, args.threads, trees)
    sys.path.insert(0, str(ROOT))
    from benchmarks.measure import write_report

    write_report(Path(args.out), "startup", data, report(data))


if __name__ == "__main__":
    main()
