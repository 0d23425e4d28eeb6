"""The default model's U-Net stage in one process with T threads against N processes with one thread each
(ldm.training.launch: accelerate, gloo DDP), the same global batch, in one run.

The recipe (ldm.shapes.recipe) builds a small init folder (the real U-Net, VAE and text-encoder architectures; 1024
training images; CLIP and VAE trained for 2 steps, which does not change the U-Net's speed); then its U-Net stage runs
`--steps` updates with cached latents once per layout, the layouts alternated `--rounds` times so load drift hits
both. Reported: images/s, the median of the logged rates after the latent cache is full, and the ratio.

    python benchmarks/research/train_processes.py                    # 1 x 2 threads vs 2 x 1 thread, batch 32
    python benchmarks/research/train_processes.py 'vae_model.block_out_channels=[16,32,32,32]' unet_model.sample_size=8 \
        unet.optim.fused=true --name f8                     # the f = 8 recipe's U-Net stage (8 x 8 latents)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import write_report  # noqa: E402
from ldm.shapes.recipe import DEFAULT_CONFIG, load_recipe, run_recipe, stage_unet  # noqa: E402

SMALL = ["data.n_train=1024", "data.n_test_held_out=8", "data.n_test_seen=8", "clip.run.max_steps=2",
         "vae.run.max_steps=2", "vae.run.validate_every=0", "unet_extend_to=[]", "unet.run.validate_every=0",
         "unet.run.checkpoint_every=100000", "unet.run.log_every=10"]


def rate(run: Path, skip_steps: int) -> float:
    """Median logged images/s of the unet run after `skip_steps` (column images_per_s of losses.csv)."""
    rows = [r.split(",") for r in (run / "unet" / "losses.csv").read_text().splitlines()]
    col = rows[0].index("images_per_s")
    return statistics.median(float(r[col]) for r in rows[1:] if int(r[0]) > skip_steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the single process")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/research/results"))
    parser.add_argument("--name", default=None, help="report suffix (train-processes-cpu-NAME)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both layouts, e.g. unet_model.sample_size=8")
    args = parser.parse_args(argv)
    skip = 1024 // args.batch + 10  # the first epoch fills the latent cache
    if args.steps <= skip + 20:
        parser.error(f"--steps must exceed {skip + 20} (the first epoch fills the latent cache)")
    layouts = {f"1 process x {args.threads} threads": [f"num_threads={args.threads}", "num_processes=1"],
               f"{args.processes} processes x 1 thread": ["num_threads=1", f"num_processes={args.processes}"]}
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        common = [*SMALL, f"unet.run.batch_size={args.batch}", f"unet.run.max_steps={args.steps}", *args.overrides]
        run_recipe(load_recipe(DEFAULT_CONFIG, base, common), base, stop_after="init")
        for r in range(args.rounds):
            for i, (name, extra) in enumerate(layouts.items()):
                run = Path(tmp) / f"run-{r}-{i}"
                shutil.copytree(base, run)
                cfg = load_recipe(DEFAULT_CONFIG, run, [*common, *extra])
                torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
                stage_unet(cfg, run)
                rates[name].append(rate(run, skip))
                shutil.rmtree(run)
    median = {name: statistics.median(v) for name, v in rates.items()}
    first, second = list(layouts)
    ratio = median[second] / median[first]
    md = ["| layout | images/s (median of rounds) | rounds |", "|---|---|---|"]
    md += [f"| {k} | {median[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in rates.items()]
    md.append(f"\n{second} / {first}: {ratio:.2f}x; default-model U-Net stage (text encoder trained jointly, cached "
              f"latents), global batch {args.batch}, {args.steps} steps per run, overrides {args.overrides or 'none'}, "
              f"torch {torch.__version__}")
    stem = "train-processes-cpu" + (f"-{args.name}" if args.name else "")
    write_report(args.out, stem, {"batch": args.batch, "steps": args.steps, "overrides": args.overrides,
                                  "rates": rates, "median": median, "ratio": ratio}, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
