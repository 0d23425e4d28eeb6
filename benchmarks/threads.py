"""Sampling and a training step of the bundled model under CPU contention, by torch thread count and OpenMP wait policy.

A user's CPU is rarely idle. With every core's thread busy-waiting in OpenMP, one other busy process can slow torch
far more than its share. Each configuration runs in a fresh process (the OpenMP settings are read when torch
starts), quiet and beside `--hogs` spinning processes, alternated over `--rounds` rounds; medians are reported.

    python benchmarks/threads.py [--steps 20] [--rounds 3] [--hogs 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.measure import write_report  # noqa: E402

WORKER = """
import sys, time, torch
from pipelines import Pipeline
steps, what = int(sys.argv[1]), sys.argv[2]
pipe = Pipeline(device="cpu")
if what == "sample":
    run = lambda: pipe("a red circle above a blue square", num_inference_steps=steps, seed=0, progress=False)
else:
    unet, opt = pipe.unet.train(), torch.optim.AdamW(pipe.unet.parameters(), 1e-5)
    x, t, c = torch.randn(8, 4, 16, 16), torch.randint(0, 1000, (8,)), torch.randn(8, 77, 64)
    def run():
        opt.zero_grad(); unet(x, t, encoder_hidden_states=c).pow(2).mean().backward(); opt.step()
run()  # warm-up
t0 = time.perf_counter()
for _ in range(1 if what == "sample" else 5):
    run()
print(time.perf_counter() - t0)
"""
CONFIGS = {  # name -> environment
    "default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def timed(env: dict[str, str], steps: int, what: str, hogs: int) -> float:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
    try:
        out = subprocess.run([sys.executable, "-c", WORKER, str(steps), what], env={**os.environ, **env}, cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=1800)
    finally:
        for p in spinners:
            p.kill()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    times: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(args.rounds):
        for what in ("sample", "train"):
            for name, env in CONFIGS.items():
                for hogs in (0, args.hogs):
                    times.setdefault((what, name, hogs), []).append(timed(env, args.steps, what, hogs))
    rows = [{"what": w, "config": n, "busy processes": h, "seconds": statistics.median(v), "runs": v}
            for (w, n, h), v in times.items()]
    md = [f"# Threads under contention ({os.cpu_count()} CPUs; {args.steps}-step sampling of the bundled model, "
          "5 training steps of its U-Net at batch 8; medians of alternated rounds)", "",
          "| what | config | busy processes | seconds | vs quiet default |", "|---|---|---|---|---|"]
    for r in rows:
        base = next(x["seconds"] for x in rows if x["what"] == r["what"] and x["config"] == "default"
                    and x["busy processes"] == 0)
        md.append(f"| {r['what']} | {r['config']} | {r['busy processes']} | {r['seconds']:.3f} | "
                  f"{r['seconds'] / base:.2f}x |")
    write_report(Path(args.out), "threads-cpu", {"rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
