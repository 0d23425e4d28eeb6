"""EMA update time: ldm.training.ema.EMA against diffusers' EMAModel (per-parameter loop and foreach), in one run.

The parameters are those the default-model recipe's U-Net stage averages after every optimizer step: the U-Net of
ldm/configs/default-model.yaml and the recipe's CLIP text tower (from its clip.model: width 64, 2 layers, 49408-token
vocabulary; the token embedding is 3.2 M of its 3.3 M weights), float32, seeded. Every repetition times one update of each
implementation, in alternating order; medians and ratios ours / diffusers are reported (< 1: ours is faster).
After the run the shadow weights are compared: ours and the loop EMAModel must agree bit for bit (same decay
sequence, same arithmetic); the foreach EMAModel may differ by rounding (reported).

    python benchmarks/research/ema.py                      # CPU, 2 threads, 30 repetitions
    python benchmarks/research/ema.py --threads 1 --reps 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.measure import compare, write_report  # noqa: E402
from ldm.training.clip import build_clip, clip_text_encoder  # noqa: E402
from ldm.config import from_dict, load_yaml  # noqa: E402
from ldm.training.ema import EMA, EMAConfig  # noqa: E402
from ldm.networks.unet import UNet, UNetConfig  # noqa: E402


def recipe_model() -> nn.Module:
    """The U-Net and text tower of the default-model recipe in one module, seeded, built as the recipe builds them
    (ldm.training.clip.build_clip + clip_text_encoder from the YAML's clip.model)."""
    recipe = load_yaml(ROOT / "ldm/configs/default-model.yaml")
    torch.manual_seed(0)
    unet = UNet(from_dict(UNetConfig, recipe["unet_model"]))
    clip = recipe["clip"]["model"]
    return nn.ModuleDict({"unet": unet, "text": clip_text_encoder(build_clip(clip), clip)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/research/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.training_utils import EMAModel

    model = recipe_model()
    params = list(model.parameters())
    ours = EMA(model, EMAConfig(decay=0.999, warmup="simple"))
    with torch.no_grad():  # weights away from the shadow, so that no update is trivial (s - p never reaches 0)
        for p in params:
            p.add_(0.01)
    done = torch.zeros(())
    results, rows = {}, []
    for foreach in (False, True):
        ref = EMAModel(params, decay=0.999, use_ema_warmup=False, foreach=foreach)
        ref.shadow_params = [s.clone() for s in ours.shadow]  # both start from the same shadow
        ours.num_updates = ref.optimization_step = 10**6  # past the warm-up: decay 0.999 (update 1 would copy p)

        def step_ours() -> torch.Tensor:
            ours.update(model)
            return done

        def step_ref() -> torch.Tensor:
            ref.step(params)
            return done

        name = f"diffusers EMAModel foreach={foreach}"
        res = compare(name, step_ours, step_ref, args.reps, torch.device("cpu"))
        diff = max((a - b).abs().max().item() for a, b in zip(ours.shadow, ref.shadow_params, strict=True))
        equal = all(torch.equal(a, b) for a, b in zip(ours.shadow, ref.shadow_params, strict=True))
        if not foreach and not equal:
            raise SystemExit(f"ours and the loop EMAModel disagree after {args.reps} updates (max |diff| {diff})")
        res.update(max_abs_shadow_diff=diff, bitwise_equal=equal)
        results[name] = res
        t = res["time_s"]
        rows.append(f"| {name} | {1000 * t['ours']:.1f} | {1000 * t['diffusers']:.1f} | {res['time_ratio']:.3f} | "
                    f"{'yes' if equal else f'no (max {diff:.1e})'} |")
    n = sum(p.numel() for p in params)
    md = ["| reference | ours (ms) | reference (ms) | ours / reference | same shadow bits |", "|---|---|---|---|---|",
          *rows, f"\n{len(params)} tensors, {n:,} float32 weights (recipe U-Net + text tower), {args.threads} CPU "
          f"threads, {args.reps} alternating repetitions (medians), torch {torch.__version__}"]
    write_report(args.out, "ema-cpu", {"threads": args.threads, "reps": args.reps, "tensors": len(params),
                                       "weights": n, "torch": torch.__version__, "results": results}, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
