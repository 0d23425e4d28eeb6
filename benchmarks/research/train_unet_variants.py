"""The recipe's whole U-Net-stage step with other U-Net layouts and latent sizes, against the recipe's step.

One step as ldm.training.unet runs it with `train_text_encoder: true`
(benchmarks/research/train_text_context.make_step: the CLIP text tower at 77 tokens, the U-Net, v-prediction loss,
clipping, fused AdamW and an EMA for each). Variants:

  recipe       ldm/configs/default-model.yaml's unet_model: 4 x 16 x 16 latents (f = 4), blocks (32, 64, 128)
  f8           the same U-Net on 4 x 8 x 8 latents (an f = 8 VAE)
  f4_4level    4 x 16 x 16 latents, blocks (16, 32, 64, 128): a thin 16 x 16 level, then the f8 variant's levels
               at 8 x 8, 4 x 4 and 2 x 2 (cross-attention at 4 x 4 and 2 x 2, as f8 has)

Steps are interleaved (round-robin) so load drift hits every variant alike; reported are median step times and
each variant's speed as a ratio to the recipe's step.

    python benchmarks/research/train_unet_variants.py                 # 2 threads, batch 32
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.research.steps import interleaved_medians, report_training_steps, training_step_setup  # noqa: E402
from benchmarks.research.train_text_context import make_batches, make_step, timing, timing_table  # noqa: E402
from ldm.networks.unet import UNetConfig  # noqa: E402

DOWN, XDOWN, UP, XUP = "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"


def variants(recipe: UNetConfig) -> dict[str, UNetConfig]:
    """The U-Net configs compared (module docstring)."""
    return {
        "recipe": recipe,
        "f8": dataclasses.replace(recipe, sample_size=recipe.sample_size // 2),
        "f4_4level": dataclasses.replace(recipe, block_out_channels=(16, 32, 64, 128),
                                         down_block_types=(DOWN, DOWN, XDOWN, XDOWN),
                                         up_block_types=(XUP, XUP, UP, UP)),
    }


def main(argv: list[str] | None = None) -> int:
    args, recipe, cfg = training_step_setup(__doc__.splitlines()[0], argv, steps=20, warmup=3)
    b, configs = args.batch, variants(cfg)
    steps = {name: make_step(v, recipe["clip"]["model"], make_batches(v, b), context=77, ema_every=1)
             for name, v in configs.items()}
    median = interleaved_medians(steps, rounds=args.steps, warmup=args.warmup)
    rows = {name: {"latent": f"{v.in_channels}x{v.sample_size}x{v.sample_size}",
                   "blocks": list(v.block_out_channels), "down_blocks": list(v.down_block_types),
                   **timing(median, name, b)} for name, v in configs.items()}
    md = timing_table(rows, {"latents": lambda r: r["latent"], "blocks": lambda r: ", ".join(map(str, r["blocks"]))},
                      f"The recipe's U-Net stage step (text encoder trained jointly, 77 tokens), batch {b}, "
                      f"{args.threads} CPU threads, {args.steps} interleaved steps per variant after {args.warmup} "
                      f"warm-up rounds (medians), torch {torch.__version__}")
    report_training_steps(args, f"train-unet-variants-cpu-threads{args.threads}", rows, md,
                          latent=cfg.sample_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
