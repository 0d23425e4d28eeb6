"""Prompt adherence of a U-Net training checkpoint, without exporting it by hand: the checkpoint's EMA weights (or
raw, --raw) go into a temporary pipeline folder (ldm.training.export, with --vae as a decoder-tuned replacement), then
benchmarks/quality.py's prompt sets are drawn and scored by the detector (ldm.shapes.detect), as its adherence
section does, at each guidance scale. Meant for watching a recipe's U-Net stage learn (docs/default-model.md).

    python benchmarks/research/checkpoint_adherence.py runs/default/unet --scales 3 5 --sampler euler_ancestral --steps 30
    python benchmarks/research/checkpoint_adherence.py runs/default/unet/checkpoints/step-00012000 --vae runs/default/vae-decoder-export
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import _pct, adherence, prompt_sets  # noqa: E402
from benchmarks.quality_metrics import ATTRIBUTES  # noqa: E402


def checkpoint_adherence(checkpoint: str | Path, scales: list[float], *, sampler: str, steps: int, n_single: int,
                         n_pair: int, vae: str | Path | None = None, use_ema: bool = True) -> dict[str, Any]:
    """{scale: {prompt set: summarize(scores)}} for the checkpoint (or a run folder's latest), and its meta."""
    from autoencoder.model import AutoencoderKL
    from ldm.training.checkpoint import read_meta
    from ldm.training.export import export, find_checkpoint
    from pipelines.text_to_image import Pipeline

    ckpt = find_checkpoint(checkpoint)
    sets = prompt_sets(n_single, n_pair)
    with tempfile.TemporaryDirectory() as tmp:
        replacement = AutoencoderKL.from_pretrained(vae) if vae is not None else None
        export(ckpt, Path(tmp) / "pipeline", use_ema=use_ema, vae=replacement, vae_name=str(vae))
        pipe = Pipeline.from_pretrained(Path(tmp) / "pipeline", device="cpu", dtype=torch.float32)
    result: dict[str, Any] = {"checkpoint": str(ckpt), "step": read_meta(ckpt).get("step"), "sampler": sampler,
                              "steps": steps, "vae": None if vae is None else str(vae), "ema": use_ema, "scales": {}}
    for s in scales:
        result["scales"][str(s)] = adherence(pipe, None, sets, guidance=s, sampler=sampler, steps=steps)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a U-Net run folder (its latest checkpoint) or one checkpoint folder")
    parser.add_argument("--vae", default=None, help="a VAE folder replacing the training one (decoder-tuned)")
    parser.add_argument("--scales", type=float, nargs="+", default=[5.0])
    parser.add_argument("--sampler", default="euler_ancestral")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--n-single", type=int, default=48, help="seen single-object prompts (held-out: half)")
    parser.add_argument("--n-pair", type=int, default=40, help="seen two-object prompts (held-out: half)")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = checkpoint_adherence(args.checkpoint, args.scales, sampler=args.sampler, steps=args.steps,
                               n_single=args.n_single, n_pair=args.n_pair, vae=args.vae, use_ema=not args.raw)
    print(f"{res['checkpoint']} (step {res['step']}, {'EMA' if res['ema'] else 'raw'}), {args.sampler} {args.steps} "
          f"steps, VAE {args.vae or 'the training one'}")
    print("| s | set | n | " + " | ".join(ATTRIBUTES) + " |")
    print("|---" * (len(ATTRIBUTES) + 3) + "|")
    for s, sets in res["scales"].items():
        for name, row in sets.items():
            print(f"| {float(s):g} | {name} | {row['n']} | " + " | ".join(_pct(row[a]) for a in ATTRIBUTES) + " |")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        from ldm.io import write_text

        write_text(json.dumps(res, indent=2), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
