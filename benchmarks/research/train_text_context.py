"""The recipe's whole U-Net-stage step with a shorter text context and a sparser EMA, against the recipe's step.

One step as ldm.training.unet runs it with `train_text_encoder: true`: the captions tokenized and encoded by the CLIP text
tower (ldm/configs/default-model.yaml `clip.model`, seeded weights), the U-Net (`unet_model`, v-prediction loss), the
gradient clipped over both, fused AdamW for each, an EMA of each. Variants:

  recipe          text_cfg.context_length 77 (CLIP's), ema.update_every 1
  context32       context_length 32: the tokenizer pads to 32 (the shapes captions are at most 22 tokens), so the
                  text tower and every cross-attention see 32 tokens instead of 77
  ema_every4      ema.update_every 4 (ldm.training.ema): the shadows move on every 4th step
  context32_ema4  both

Steps are interleaved (round-robin) so load drift hits every variant alike; reported are median step times and
each variant's speed as a ratio to the recipe's step.

    python benchmarks/research/train_text_context.py --latent 8          # the f = 8 U-Net (8 x 8 latents), 2 threads
    python benchmarks/research/train_text_context.py --threads 1
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.research.steps import interleaved_medians, report_training_steps, training_step_setup  # noqa: E402
from ldm.training.clip import build_clip, clip_text_encoder  # noqa: E402
from ldm.diffusion.losses import diffusion_loss  # noqa: E402
from ldm.diffusion.process import q_sample  # noqa: E402
from ldm.training.ema import EMA, EMAConfig  # noqa: E402
from ldm.diffusion.schedule import sd_schedule  # noqa: E402
from ldm.networks.unet import UNet, UNetConfig  # noqa: E402

VARIANTS: dict[str, tuple[int, int]] = {  # name: (context_length, ema.update_every)
    "recipe": (77, 1),
    "context32": (32, 1),
    "ema_every4": (77, 4),
    "context32_ema4": (32, 4),
}


def make_step(cfg: UNetConfig, clip_model: dict, batches: list[tuple[list[str], torch.Tensor, torch.Tensor,
              torch.Tensor]], *, context: int, ema_every: int, ddp: bool = False) -> Callable[[], torch.Tensor]:
    """One joint U-Net + text-encoder training step per call over `batches` in turn, from fresh seeded weights;
    `ddp`: both modules under DistributedDataParallel (a process group must exist). The returned function's
    `num_params` is the number of trained parameters (the gradient floats a data-parallel step exchanges)."""
    model = {**clip_model, "text_cfg": {**clip_model["text_cfg"], "context_length": context}}
    text = clip_text_encoder(build_clip(model, seed=0), model).train()
    torch.manual_seed(0)
    unet = UNet(cfg).train()
    params = [*unet.parameters(), *text.parameters()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, fused=True) for m in (unet, text)]
    emas = [EMA(m, EMAConfig(decay=0.999, update_every=ema_every)) for m in (unet, text)]
    raw = (unet, text)
    if ddp:
        unet, text = (torch.nn.parallel.DistributedDataParallel(m) for m in raw)
    ac = sd_schedule().alphas_cumprod()
    position = [0]

    def step() -> torch.Tensor:
        captions, z, t, eps = batches[position[0] % len(batches)]
        position[0] += 1
        c = text(captions)
        out = unet(q_sample(z, t, ac, eps), t, c).float()
        loss = diffusion_loss(out, z, eps, t, ac, prediction="v_prediction").mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for ema, m in zip(emas, raw):
            ema.update(m)
        return loss.detach()

    step.num_params = sum(p.numel() for p in params)  # type: ignore[attr-defined]
    return step


def make_batches(cfg: UNetConfig, batch: int, seed: int = 0, count: int = 4
                 ) -> list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`count` batches of (captions from the benchmark's prompt sets, latents, t, noise) for make_step."""
    from benchmarks.quality import prompt_sets

    captions = [p for prompts in prompt_sets(48, 40).values() for p in prompts]
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return [([captions[(i * batch + j) % len(captions)] for j in range(batch)], torch.randn(shape, generator=g),
             torch.randint(0, 1000, (batch,), generator=g), torch.randn(shape, generator=g)) for i in range(count)]


def timing(median: dict[str, float], name: str, batch: int) -> dict[str, float]:
    """A variant's step time, images/s and speed as a ratio to the "recipe" variant's step."""
    return {"step_ms": 1000 * median[name], "images_per_s": batch / median[name],
            "speed_over_recipe": median["recipe"] / median[name]}


def timing_table(rows: dict[str, dict], columns: dict[str, Callable[[dict], str]], note: str) -> list[str]:
    """Markdown: one row per variant, `columns` (header: cell of a row) then step time, images/s and speed, then
    `note` as a paragraph."""
    heads = ["variant", *columns, "step (ms)", "images/s", "speed / recipe"]
    md = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    md += ["| " + " | ".join([k, *(cell(r) for cell in columns.values()), f"{r['step_ms']:.1f}",
                              f"{r['images_per_s']:.1f}", f"{r['speed_over_recipe']:.3f}"]) + " |"
           for k, r in rows.items()]
    return [*md, "", note]


def main(argv: list[str] | None = None) -> int:
    args, recipe, cfg = training_step_setup(__doc__.splitlines()[0], argv, steps=30, warmup=4)
    b, side = args.batch, cfg.sample_size
    batches = make_batches(cfg, b)
    steps = {name: make_step(cfg, recipe["clip"]["model"], batches, context=n, ema_every=m)
             for name, (n, m) in VARIANTS.items()}
    median = interleaved_medians(steps, rounds=args.steps, warmup=args.warmup)
    rows = {name: {"context_length": VARIANTS[name][0], "ema_update_every": VARIANTS[name][1],
                   **timing(median, name, b)} for name in steps}
    md = timing_table(rows, {"context": lambda r: str(r["context_length"]),
                             "EMA every": lambda r: str(r["ema_update_every"])},
                      f"The recipe's U-Net stage step (text encoder trained jointly), U-Net on {side} x {side} "
                      f"latents, batch {b}, {args.threads} CPU threads, {args.steps} interleaved steps per variant "
                      f"after {args.warmup} warm-up rounds (medians), torch {torch.__version__}")
    stem = f"train-text-context-cpu-latent{side}-threads{args.threads}"
    report_training_steps(args, stem, rows, md, latent=side)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
