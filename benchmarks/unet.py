"""Forward time and peak memory of our U-Net and VAE decoder against diffusers', same weights, one run.

    python benchmarks/unet.py                      # CPU, float32, SD 1.5 shapes, 3 repetitions
    python benchmarks/unet.py --quick              # 1 repetition
    python benchmarks/unet.py --latent 32          # quarter-size inputs (256 px), for a slow or busy CPU
    python benchmarks/unet.py --device cuda --dtype float16 --reps 20

U-Net: ldm/configs/unet-sd15.yaml with diffusers' random initialisation, batch 2, 4 x 64 x 64 latents, 77 x 768 text.
VAE: ldm/configs/vae-sd.yaml, decode of a 1 x 4 x 64 x 64 latent to a 512 x 512 image. Our modules share diffusers'
weight tensors (loaded by name, strict), so both sides read the same memory. Each repetition times ours and
diffusers' back to back, alternating which goes first; the median over repetitions and the ratio ours / diffusers
are reported (a ratio <= 1 means ours is as fast or faster), in wall-clock and in process CPU time. At full SD
shapes one U-Net forward takes tens of seconds on 2 CPU cores, so the default CPU run takes several minutes
(more on a busy machine); --quick or --latent 32 shorten it. Outputs are compared (max abs difference) to show the
two compute the same function.

Peak memory. CUDA: torch.cuda.max_memory_allocated during the call minus the memory allocated before it. CPU: the
increase of the process's peak resident set size (VmHWM) over its resident size just before the call; the peak is
reset before each call by writing 5 to /proc/self/clear_refs (Linux >= 4.0). So that freed tensors really leave the
resident set (and one call's freed pages do not hide the next call's), the script re-executes itself with a fixed
glibc mmap threshold (MALLOC_MMAP_THRESHOLD_=131072: every tensor over 128 KiB is its own mmap, unmapped on free).
This counts what the call makes resident: activations, temporaries and allocator overhead, not the weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import MMAP_ENV, compare, reexec_with_mmap_threshold, write_report  # noqa: E402


def bench_unet(args, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import UNet2DConditionModel

    from ldm.config import load_config
    from ldm.networks.unet import UNet, UNetConfig

    cfg = load_config(UNetConfig, ROOT / "ldm/configs/unet-sd15.yaml")
    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(cfg.to_diffusers()).to(device, dtype).eval()
    # diffusers' default processor is AttnProcessor2_0 (scaled_dot_product_attention), the same kernel as ours
    with torch.device("meta"):
        ours = UNet(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    ours.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device, dtype)
    c = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500, device=device)
    with torch.inference_mode():  # warm-up at a small size: library initialisation, kernel selection
        ours(x[:1, :, :16, :16], t[:1], c[:1])
        theirs(x[:1, :, :16, :16], t[:1], c[:1])
        return compare("unet", lambda: ours(x, t, c), lambda: theirs(x, t, c).sample, args.reps, device)


def bench_vae(args, device: torch.device, dtype: torch.dtype) -> dict:
    try:
        from autoencoder.model import AutoencoderKL, VAEConfig
    except ImportError as e:
        return {"skipped": f"autoencoder.model.AutoencoderKL is not available yet ({e})"}
    from diffusers import AutoencoderKL as DAutoencoderKL

    from ldm.config import load_config

    cfg = load_config(VAEConfig, ROOT / "ldm/configs/vae-sd.yaml")
    torch.manual_seed(0)
    theirs = DAutoencoderKL.from_config(cfg.to_diffusers()).to(device, dtype).eval()
    ours = AutoencoderKL(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    ours.eval()
    z = torch.randn(1, cfg.latent_channels, args.latent, args.latent, generator=torch.Generator().manual_seed(2))
    z = z.to(device, dtype)
    with torch.inference_mode():
        ours.decode(z[..., :8, :8])
        theirs.decode(z[..., :8, :8])
        return compare("vae-decode", lambda: ours.decode(z), lambda: theirs.decode(z).sample, args.reps, device)


def report_md(res: dict) -> str:
    lines = [
        "# U-Net and VAE decoder: ours vs diffusers",
        "",
        f"device `{res['device']}`, dtype `{res['dtype']}`, torch {res['torch']}, diffusers {res['diffusers']}, "
        f"{res['threads']} threads, {res['reps']} repetitions (median), {res['platform']}",
        "",
        "| model | shape | ours (s) | diffusers (s) | time ratio | CPU-time ratio | ours peak (MiB) "
        "| diffusers peak (MiB) | mem ratio | max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["results"].items():
        if "skipped" in r:
            lines.append(f"| {name} | {r.get('shape', '')} | skipped: {r['skipped']} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['shape']} | {r['time_s']['ours']:.3f} | {r['time_s']['diffusers']:.3f} | "
            f"{r['time_ratio']:.3f} | {r['cpu_time_ratio']:.3f} | {r['peak_mem_mib']['ours']:.0f} | {r['peak_mem_mib']['diffusers']:.0f} | "
            f"{r['mem_ratio']:.3f} | {r['max_abs_output_diff']:.2e} |"
        )
    lines += [
        "", "Times are wall-clock medians; the CPU-time ratio (process CPU seconds, all threads) is the steadier "
        "number on a machine shared with other jobs.", "", "Peak memory: " + res["memory_method"], "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per model (default 3)")
    p.add_argument("--quick", action="store_true", help="one repetition")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (default 2)")
    p.add_argument("--latent", type=int, default=64, help="latent height = width (default 64: 512 px)")
    p.add_argument("--skip-vae", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="folder for unet.json and unet.md")
    args = p.parse_args()
    if args.quick:
        args.reps = 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        print("note: float16 on CPU is slow and not what either library is tuned for", file=sys.stderr)
    import diffusers

    mem_method = (
        "torch.cuda.max_memory_allocated during the call minus memory allocated before it"
        if device.type == "cuda" else
        "increase of peak RSS (VmHWM, reset through /proc/self/clear_refs) over RSS before the call, "
        f"with {MMAP_ENV}={os.environ.get(MMAP_ENV, 'unset')} so freed tensors leave the resident set"
    )
    res = {
        "device": str(device), "dtype": args.dtype, "reps": args.reps, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "memory_method": mem_method, "results": {},
    }
    print(f"U-Net SD 1.5: batch {args.batch}, latents 4x{args.latent}x{args.latent}, text 77x768", flush=True)
    unet = bench_unet(args, device, dtype)
    unet["shape"] = f"B={args.batch}, 4x{args.latent}x{args.latent}, text 77x768"
    res["results"]["unet-sd15"] = unet
    if not args.skip_vae:
        print(f"VAE decoder (SD): latent 1x4x{args.latent}x{args.latent}", flush=True)
        vae = bench_vae(args, device, dtype)
        vae["shape"] = f"B=1, 4x{args.latent}x{args.latent} -> 3x{8 * args.latent}x{8 * args.latent}"
        res["results"]["vae-decode"] = vae
    write_report(args.out, "unet", res, report_md(res))


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
