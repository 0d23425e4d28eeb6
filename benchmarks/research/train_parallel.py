"""What a second process can add to the recipe's U-Net-stage step on this CPU, with and without gradient exchange.

The step is benchmarks/research/train_text_context.make_step's (CLIP text tower at 77 tokens + U-Net, v-prediction
loss, clipping, fused AdamW, EMA), the global batch fixed. Layouts, each run alone:

  1 x T threads        one process, the whole batch (the recipe's layout)
  N x 1, independent   N processes, batch / N each, no communication at all: the ceiling of any data parallelism
  N x 1, DDP           the same under torch DistributedDataParallel (gloo), gradients all-reduced every step

Reported: median step time of rank 0 after warm-up (the median of 3 rounds, the layouts alternated), global
images/s and the ratio to the first layout. Separately,
the time of one gloo all-reduce of the step's gradient volume (U-Net + text tower parameters).

    python benchmarks/research/train_parallel.py --latent 8              # the f = 8 U-Net, 2 processes
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.research.steps import report_training_steps, training_step_setup  # noqa: E402
from ldm.training.launch import free_port  # noqa: E402

ROUNDS = 3  # each layout runs once per round, in fresh processes; reported: the median over rounds


def worker(rank: int, world: int, port: int, mode: str, cfg, clip_model: dict, batch: int, steps: int,
           warmup: int, threads: int, result: dict) -> None:
    """Run `steps` joint steps in one process of `world`; rank 0 stores its median step time (and the all-reduce
    time of the gradient volume) in `result`."""
    from benchmarks.research.train_text_context import make_batches, make_step

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    step = make_step(cfg, clip_model, make_batches(cfg, batch, seed=rank), context=77, ema_every=1,
                     ddp=mode == "ddp")
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if world > 1 and mode == "ddp":
        flat = torch.zeros(step.num_params)  # type: ignore[attr-defined]
        for _ in range(2):
            dist.all_reduce(flat)
        t0 = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(flat)
        if rank == 0:
            result.update(grad_floats=len(flat), all_reduce_ms=1000 * (time.perf_counter() - t0) / 5)
    if rank == 0:
        result["step_s"] = statistics.median(times[warmup:])
    if world > 1:
        dist.destroy_process_group()


def run_layout(world: int, mode: str, cfg, clip_model: dict, batch: int, steps: int, warmup: int,
               threads: int) -> dict:
    """One layout in fresh processes; rank 0's measurements."""
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(worker, args=(world, free_port(), mode, cfg, clip_model, batch // world, steps, warmup, threads,
                               result), nprocs=world)
        return dict(result)


def main(argv: list[str] | None = None) -> int:
    args, recipe, cfg = training_step_setup(__doc__.splitlines()[0], argv, steps=25, warmup=5)
    n, b, clip_model = 2, args.batch, recipe["clip"]["model"]
    layouts = {f"1 x {args.threads} threads": (1, "single", args.threads),
               f"{n} x 1 thread, independent": (n, "independent", 1),
               f"{n} x 1 thread, DDP": (n, "ddp", 1)}
    rows, extra = {}, {}
    step_s: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(ROUNDS):  # the layouts alternated, so load drift hits all of them
        for name, (world, mode, threads) in layouts.items():
            res = run_layout(world, mode, cfg, clip_model, b, args.steps, args.warmup, threads)
            extra.update({k: v for k, v in res.items() if k != "step_s"})
            step_s[name].append(res["step_s"])
    for name, (world, mode, threads) in layouts.items():
        s = statistics.median(step_s[name])
        rows[name] = {"processes": world, "threads_each": threads, "step_ms": 1000 * s, "images_per_s": b / s,
                      "rounds_step_ms": [1000 * x for x in step_s[name]]}
    first = next(iter(rows.values()))["images_per_s"]
    for r in rows.values():
        r["speed_over_single"] = r["images_per_s"] / first
    md = ["| layout | step (ms), median | rounds (ms) | images/s (global) | speed / 1 process |",
          "|---|---|---|---|---|"]
    md += [f"| {k} | {r['step_ms']:.1f} | {', '.join(f'{x:.0f}' for x in r['rounds_step_ms'])} | "
           f"{r['images_per_s']:.1f} | {r['speed_over_single']:.3f} |" for k, r in rows.items()]
    side = cfg.sample_size
    md.append(f"\nThe recipe's U-Net stage step (text encoder trained jointly, 77 tokens), U-Net on {side} x {side} "
              f"latents, global batch {b}, {args.steps} steps per layout and round after {args.warmup} warm-up steps "
              f"(rank 0's median), {ROUNDS} rounds. One gloo all-reduce of the "
              f"{extra.get('grad_floats', 0) / 1e6:.2f} M gradient floats: "
              f"{extra.get('all_reduce_ms', float('nan')):.1f} ms. torch {torch.__version__}")
    rows["all_reduce"] = extra
    report_training_steps(args, f"train-parallel-cpu-latent{side}", rows, md, latent=side)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
