"""What the training-step experiments share: their command line, interleaved step timing and their report.

Each experiment times variants of the default model's U-Net-stage step against each other on the CPU; the steps are
interleaved (round-robin) so that load drift hits every variant alike. Reports go to benchmarks/research/results.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from benchmarks.measure import measure, write_report

if TYPE_CHECKING:
    from ldm.networks.unet import UNetConfig

ROOT = Path(__file__).resolve().parents[2]


def interleaved_medians(steps: dict[str, Callable[[], torch.Tensor]], *, rounds: int,
                        warmup: int) -> dict[str, float]:
    """Median wall seconds of each CPU step function over `rounds` rounds that call every function once in turn
    (round-robin, so load drift hits all alike), after `warmup` unmeasured rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, fn in steps.items():
            elapsed = measure(fn, torch.device("cpu"))[1]
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def training_step_setup(description: str, argv: list[str] | None, *, steps: int, warmup: int
                        ) -> tuple[argparse.Namespace, dict, UNetConfig]:
    """The training-step benchmarks' command line (batch, measured steps, warm-up rounds, threads, latent side, out),
    torch's thread count set from it, ldm/configs/default-model.yaml and its U-Net config at that latent side."""
    from ldm.config import from_dict, load_yaml
    from ldm.networks.unet import UNetConfig

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=steps, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the recipe's sample_size)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/research/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_yaml(ROOT / "ldm/configs/default-model.yaml")
    unet = recipe["unet_model"]
    return args, recipe, from_dict(UNetConfig, {**unet, "sample_size": args.latent or unet["sample_size"]})


def report_training_steps(args: argparse.Namespace, stem: str, rows: dict, markdown: list[str], *,
                          latent: int) -> None:
    """Write a training-step benchmark's report (its settings and `rows`) as JSON + Markdown, and print the table."""
    data = {"batch": args.batch, "latent": latent, "threads": args.threads, "steps": args.steps,
            "torch": torch.__version__, "variants": rows}
    write_report(args.out, stem, data, "\n".join(markdown))
