"""Training throughput: our U-Net training step against the equivalent diffusers loop, in one run.

Both sides train from the same initial weights on the same latents, captions embeddings, timesteps and noise with the
same AdamW: ours is ldm.networks.unet.UNet + ldm.diffusion.process.q_sample / losses.diffusion_loss; diffusers' is UNet2DConditionModel +
DDPMScheduler.add_noise + F.mse_loss. Steps alternate (ours, diffusers, diffusers, ours, ...) so load drift hits
both; reports images/s from the median step time (wall and process CPU time) and the median peak memory of a step
(benchmarks/measure.py: CUDA max allocated; CPU peak-RSS growth with the peak reset before each step), and writes
benchmarks/results/train-<device>.json and .md. The reported output difference is that of the losses.

    python benchmarks/train.py                       # CPU, tiny config
    python benchmarks/train.py --device cuda --dtype float16 --unet ldm/configs/unet-sd15.yaml --batch 4 --latent 64
    python benchmarks/train.py --lora                # LoRA: ours vs diffusers + peft, and vs our full fine-tune

--lora trains a rank-4 LoRA of the attention projections (to_q, to_k, to_v, to_out.0; ldm.training.lora.add_lora)
against diffusers' UNet2DConditionModel.add_adapter(peft LoraConfig) with the same initial LoRA weights (the loop of
diffusers' examples/text_to_image/train_text_to_image_lora.py), and against our full fine-tune of the same U-Net;
writes benchmarks/results/train-lora.json and .md.

--dtype float16 / bfloat16 runs both forward passes under torch.autocast in that dtype (fp32 weights and AdamW, the
mixed precision `accelerate launch --mixed_precision` gives), with a gradient scaler for float16 on both sides.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.measure import compare, reexec_with_mmap_threshold, write_report  # noqa: E402

from ldm.config import load_config  # noqa: E402
from ldm.diffusion.losses import diffusion_loss  # noqa: E402
from ldm.diffusion.process import q_sample  # noqa: E402
from ldm.diffusion.schedule import sd_schedule  # noqa: E402
from ldm.networks.unet import UNet, UNetConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--unet", default=str(ROOT / "ldm/configs/unet-tiny.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="autocast dtype of the forward passes (weights and optimizer stay fp32)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    parser.add_argument("--lora", action="store_true", help="LoRA training: ours vs diffusers + peft vs full fine-tune")
    parser.add_argument("--rank", type=int, default=4, help="--lora's rank")
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

    counters = {"ours": 0, "diffusers": 0}
    dtype = getattr(torch, args.dtype)
    amp = dtype != torch.float32
    scalers = {k: torch.amp.GradScaler(device.type, enabled=dtype == torch.float16) for k in counters}

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=amp)

    def update(who: str, loss: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
        scalers[who].scale(loss).backward()
        scalers[who].step(opt)
        scalers[who].update()
        opt.zero_grad(set_to_none=True)
        return loss.detach().float()

    def step_ours() -> torch.Tensor:
        z, c, t, eps = data[counters["ours"]]
        counters["ours"] += 1
        with autocast():
            loss = diffusion_loss(ours(q_sample(z, t, ac, eps), t, c).float(), z, eps, t, ac).mean()
        return update("ours", loss, opt_ours)

    def step_theirs() -> torch.Tensor:
        z, c, t, eps = data[counters["diffusers"]]
        counters["diffusers"] += 1
        with autocast():
            loss = F.mse_loss(theirs(ddpm.add_noise(z, eps, t), t, encoder_hidden_states=c).sample.float(), eps)
        return update("diffusers", loss, opt_theirs)

    if args.lora:
        return lora_benchmark(args, ours, theirs, step_ours, update, autocast, data, ac, ddpm, device)
    for _ in range(args.warmup):
        step_ours(), step_theirs()
    res = compare("train step", step_ours, step_theirs, args.steps, device)
    results = {
        who: {
            "images_per_s": args.batch / res["time_s"][who],
            "images_per_cpu_s": args.batch / res["cpu_time_s"][who],
            "peak_memory_mb": res["peak_mem_mib"][who],
        }
        for who in ("ours", "diffusers")
    }
    ratio = res["time_ratio"] ** -1
    report = {"device": args.device, "dtype": args.dtype, "unet": args.unet, "batch": args.batch, "latent": args.latent,
              "steps": args.steps, "torch": torch.__version__, **results, "throughput_ratio_ours_over_diffusers": ratio,
              "cpu_throughput_ratio_ours_over_diffusers": res["cpu_time_ratio"] ** -1,
              "memory_ratio_ours_over_diffusers": res["mem_ratio"], "max_abs_loss_diff": res["max_abs_output_diff"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = ["| loop | images/s (wall) | images per CPU-second | peak memory of a step (MiB) |", "|---|---|---|---|"]
    md += [f"| {k} | {results[k]['images_per_s']:.2f} | {results[k]['images_per_cpu_s']:.2f} | "
           f"{results[k]['peak_memory_mb']:.1f} |" for k in results]
    md.append(f"\nours / diffusers: throughput {ratio:.3f} (wall), {report['cpu_throughput_ratio_ours_over_diffusers']:.3f} "
              f"(CPU time), peak memory {res['mem_ratio']:.3f}; {args.device}, {args.dtype}, {Path(args.unet).name}, batch "
              f"{args.batch}, latent {args.latent}, {args.steps} alternated steps (medians); max |loss difference| "
              f"{res['max_abs_output_diff']:.2e}")
    write_report(out, f"train-{args.device}", report, "\n".join(md))
    return 0


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def lora_benchmark(args, ours, theirs, step_full, update, autocast, data, ac, ddpm, device) -> int:
    """LoRA step time and peak memory: ours (ldm.training.lora on our U-Net) vs diffusers + peft (add_adapter) on the
    same weights, LoRA init and data, and vs our full fine-tune (`step_full`); writes train-lora.json / .md."""
    import copy

    from peft import LoraConfig as PeftLoraConfig

    from ldm.training.lora import LoraConfig, add_lora, lora_modules

    mine = copy.deepcopy(ours)
    add_lora(mine, LoraConfig(rank=args.rank, init="gaussian"), TARGETS)
    theirs.requires_grad_(False)
    theirs.add_adapter(PeftLoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                      target_modules=TARGETS))
    state = lora_modules(mine).state_dict()
    with torch.no_grad():  # the same initial LoRA weights on both sides
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(state[name.replace(".default.", ".")])
    trainable = [p for p in mine.parameters() if p.requires_grad]
    opts = {"lora": torch.optim.AdamW(trainable, lr=1e-4),
            "peft": torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-4)}
    counters = {"lora": 0, "peft": 0}

    def step_lora() -> torch.Tensor:
        z, c, t, eps = data[counters["lora"] % len(data)]  # it runs twice as many steps: data repeats
        counters["lora"] += 1
        with autocast():
            loss = diffusion_loss(mine(q_sample(z, t, ac, eps), t, c).float(), z, eps, t, ac).mean()
        return update("ours", loss, opts["lora"])

    def step_peft() -> torch.Tensor:
        z, c, t, eps = data[counters["peft"]]
        counters["peft"] += 1
        with autocast():
            loss = F.mse_loss(theirs(ddpm.add_noise(z, eps, t), t, encoder_hidden_states=c).sample.float(), eps)
        return update("diffusers", loss, opts["peft"])

    for _ in range(args.warmup):
        step_lora(), step_peft(), step_full()
    vs_peft = compare("LoRA step", step_lora, step_peft, args.steps, device)
    vs_full = compare("LoRA vs full step", step_lora, step_full, args.steps, device)
    rows = {"ours LoRA": (vs_peft["time_s"]["ours"], vs_peft["peak_mem_mib"]["ours"]),
            "diffusers + peft LoRA": (vs_peft["time_s"]["diffusers"], vs_peft["peak_mem_mib"]["diffusers"]),
            "ours full fine-tune": (vs_full["time_s"]["diffusers"], vs_full["peak_mem_mib"]["diffusers"])}
    n_lora, n_all = sum(p.numel() for p in trainable), sum(p.numel() for p in ours.parameters())
    report = {"device": args.device, "dtype": args.dtype, "unet": args.unet, "batch": args.batch, "latent": args.latent,
              "steps": args.steps, "rank": args.rank, "targets": TARGETS, "torch": torch.__version__,
              "trainable_lora": n_lora, "trainable_full": n_all,
              **{k: {"step_s": t, "images_per_s": args.batch / t, "peak_memory_mb": m} for k, (t, m) in rows.items()},
              "speed_ratio_ours_over_peft": vs_peft["time_ratio"] ** -1,
              "memory_ratio_ours_over_peft": vs_peft["mem_ratio"],
              "speed_ratio_lora_over_full": vs_full["time_ratio"] ** -1,
              "memory_ratio_lora_over_full": vs_full["mem_ratio"],
              "max_abs_loss_diff_vs_peft": vs_peft["max_abs_output_diff"]}
    md = ["| loop | step (s, median) | images/s | peak memory of a step (MiB) |", "|---|---|---|---|"]
    md += [f"| {k} | {t:.4f} | {args.batch / t:.2f} | {m:.1f} |" for k, (t, m) in rows.items()]
    md.append(f"\nours LoRA / diffusers + peft: speed {report['speed_ratio_ours_over_peft']:.3f}x, peak memory "
              f"{vs_peft['mem_ratio']:.3f}x (max |loss difference| {vs_peft['max_abs_output_diff']:.2e}, the same "
              f"weights, LoRA init and data); ours LoRA / our full fine-tune: speed "
              f"{report['speed_ratio_lora_over_full']:.3f}x, peak memory {vs_full['mem_ratio']:.3f}x. Rank {args.rank} "
              f"on {', '.join(TARGETS)}: {n_lora:,} trained parameters of {n_all:,}. {args.device}, {args.dtype}, "
              f"{Path(args.unet).name}, batch {args.batch}, latent {args.latent}, {args.steps} alternated steps "
              "(medians); memory: benchmarks/measure.py (CPU: peak-RSS growth within a step).")
    write_report(Path(args.out), "train-lora", report, "\n".join(md))
    return 0


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    raise SystemExit(main())
