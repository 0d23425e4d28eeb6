"""Training-step options on the default model's U-Net, against the plain float32 step, in one run.

Every variant trains its own copy of the same seeded U-Net (ldm/configs/default-model.yaml `unet_model`, 4 x 16 x 16
latents, 77 x 64 text states) on the same batches; the variants' steps are interleaved (round-robin) so load drift
hits all of them. Reported: the median step time, images/s and each variant's speed as a ratio to the plain step.

  plain          float32, torch's AdamW (per-parameter loop: torch's CPU default)
  fused          optim.fused: torch's fused AdamW kernel
  bf16           run.mixed_precision=bf16: torch.autocast(bfloat16) around the forward
  channels_last  the U-Net's weights and input in channels-last memory format (not a training option; measured)

    python benchmarks/research/train_options.py                     # CPU, batch 32, 2 threads
    python benchmarks/research/train_options.py --batch 64 --threads 1
    python benchmarks/research/train_options.py --latent 8      # the U-Net on 8 x 8 latents (an f = 8 VAE)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.research.steps import interleaved_medians, report_training_steps, training_step_setup  # noqa: E402
from ldm.diffusion.losses import diffusion_loss  # noqa: E402
from ldm.diffusion.process import q_sample  # noqa: E402
from ldm.diffusion.schedule import sd_schedule  # noqa: E402
from ldm.networks.unet import UNet, UNetConfig  # noqa: E402

VARIANTS: dict[str, dict[str, bool]] = {
    "plain": {},
    "fused": {"fused": True},
    "bf16": {"bf16": True},
    "channels_last": {"channels_last": True},
}


def make_step(cfg: UNetConfig, data: list[tuple[torch.Tensor, ...]], *, fused: bool = False, bf16: bool = False,
              channels_last: bool = False) -> Callable[[], torch.Tensor]:
    """One training step per call over `data` in turn (v-prediction loss, AdamW lr 1e-4) for a fresh seeded U-Net."""
    torch.manual_seed(0)
    unet = UNet(cfg).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True if fused else None)
    ac = sd_schedule().alphas_cumprod()
    position = [0]

    def step() -> torch.Tensor:
        z, c, t, eps = data[position[0] % len(data)]
        position[0] += 1
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = unet(q_sample(z, t, ac, eps).contiguous(memory_format=fmt), t, c).float()
        loss = diffusion_loss(out, z, eps, t, ac, prediction="v_prediction").mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main(argv: list[str] | None = None) -> int:
    args, _, cfg = training_step_setup(__doc__.splitlines()[0], argv, steps=8, warmup=2)
    g = torch.Generator().manual_seed(0)
    b, side = args.batch, cfg.sample_size
    data = [(torch.randn(b, cfg.in_channels, side, side, generator=g), torch.randn(b, 77, cfg.cross_attention_dim,
             generator=g), torch.randint(0, 1000, (b,), generator=g), torch.randn(b, cfg.in_channels, side, side,
             generator=g)) for _ in range(4)]
    steps = {name: make_step(cfg, data, **kw) for name, kw in VARIANTS.items()}
    median = interleaved_medians(steps, rounds=args.steps, warmup=args.warmup)
    rows = {name: {"step_ms": 1000 * median[name], "images_per_s": b / median[name],
                   "speed_over_plain": median["plain"] / median[name]} for name in steps}
    md = ["| variant | step (ms) | images/s | speed / plain |", "|---|---|---|---|"]
    md += [f"| {k} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | {r['speed_over_plain']:.3f} |"
           for k, r in rows.items()]
    md.append(f"\nU-Net of ldm/configs/default-model.yaml ({sum(p.numel() for p in UNet(cfg).parameters()):,} parameters), "
              f"batch {b}, latent {side}, {args.threads} CPU threads, {args.steps} interleaved steps per variant "
              f"(medians), torch {torch.__version__}")
    stem = "train-options-cpu" + ("" if args.latent is None else f"-latent{side}")
    report_training_steps(args, stem, rows, md, latent=side)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
