"""Training throughput: our U-Net training step against the equivalent diffusers loop, in one run.

Both sides train from the same initial weights on the same latents, captions embeddings, timesteps and noise with the
same AdamW: ours is ldm.unet.UNet + ldm.diffusion.q_sample/diffusion_loss; diffusers' is UNet2DConditionModel +
DDPMScheduler.add_noise + F.mse_loss. Reports images/s (median over timed steps) and peak memory (CUDA: max allocated;
CPU: peak RSS growth), writes benchmarks/results/train-<device>.json and .md.

    python benchmarks/train.py                       # CPU, tiny config
    python benchmarks/train.py --device cuda --unet configs/unet-sd15.yaml --batch 4 --latent 64
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.config import load_config
from ldm.diffusion import diffusion_loss, q_sample
from ldm.train_config import sd_schedule
from ldm.unet import UNet, UNetConfig

ROOT = Path(__file__).resolve().parents[1]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_loop(step, n_warmup: int, n_steps: int, device: torch.device) -> tuple[list[float], float]:
    for i in range(n_warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(n_steps):
        t0 = time.perf_counter()
        step(n_warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, peak_memory_mb(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--unet", default=str(ROOT / "configs/unet-tiny.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=8, help="latent side (image side / 8)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args(argv)
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = torch.device(args.device)
    cfg = load_config(UNetConfig, args.unet)
    torch.manual_seed(0)
    ours = UNet(cfg).to(device).train()
    theirs = UNet2DConditionModel.from_config(cfg.to_diffusers()).to(device).train()
    theirs.load_state_dict(ours.state_dict())
    schedule = sd_schedule()
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = schedule.alphas_cumprod().to(device)
    g = torch.Generator().manual_seed(0)
    n = args.steps + args.warmup
    data = [(torch.randn(args.batch, cfg.in_channels, args.latent, args.latent, generator=g),
             torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g),
             torch.randint(0, 1000, (args.batch,), generator=g),
             torch.randn(args.batch, cfg.in_channels, args.latent, args.latent, generator=g)) for _ in range(n)]
    data = [tuple(t.to(device) for t in d) for d in data]
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4)

    def step_ours(i: int) -> None:
        z, c, t, eps = data[i]
        loss = diffusion_loss(ours(q_sample(z, t, ac, eps), t, c), z, eps, t, ac).mean()
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs(i: int) -> None:
        z, c, t, eps = data[i]
        loss = F.mse_loss(theirs(ddpm.add_noise(z, eps, t), t, encoder_hidden_states=c).sample, eps)
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    results = {}
    for name, step in (("diffusers", step_theirs), ("ours", step_ours)):
        times, mem = time_loop(step, args.warmup, args.steps, device)
        results[name] = {"images_per_s": args.batch / statistics.median(times), "peak_memory_mb": mem}
    ratio = results["ours"]["images_per_s"] / results["diffusers"]["images_per_s"]
    report = {"device": args.device, "unet": args.unet, "batch": args.batch, "latent": args.latent,
              "steps": args.steps, "torch": torch.__version__, **results, "throughput_ratio_ours_over_diffusers": ratio}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train-{args.device}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = ["| loop | images/s | peak memory (MB) |", "|---|---|---|"]
    md += [f"| {k} | {results[k]['images_per_s']:.2f} | {results[k]['peak_memory_mb']:.0f} |" for k in results]
    md.append(f"\nours / diffusers throughput: {ratio:.3f} ({args.device}, {Path(args.unet).name}, batch {args.batch}, "
              f"latent {args.latent}; CPU peak memory is the process's max RSS, cumulative)")
    (out / f"train-{args.device}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
