"""DeepCache feature caching: seconds per image and closeness to the uncached result, our Pipeline (`cache_interval`,
`cache_depth`) against diffusers' StableDiffusionPipeline with the DeepCache package's DeepCacheSDHelper, one run.

    python benchmarks/caching.py            # CPU fp32: SD 1.5 shapes at 32 x 32 latents, 8 steps, N = 1 3 5; the bundled
                                            # model (about 3 minutes on 2 idle cores)
    python benchmarks/caching.py --quick    # 4 steps, two bundled prompts
    python benchmarks/caching.py --device cuda --dtype float16   # 64 x 64 latents, 50 steps, N = 1 2 3 5, 5 repetitions

SD 1.5-shaped random weights (benchmarks/pipeline.py's `build_pair`: diffusers' seeded initialisation, ours loading the
very same tensors), one image, guidance 7.5 (U-Net batch 2), the same initial latents on both sides, the diffusers
scheduler whose timesteps our sampler walks. For each cache interval N (1: no cache on either side, the uncached
reference; DeepCache's helper is not attached), ours and diffusers' are timed back to back, alternating which goes first
(benchmarks/measure.py); medians over repetitions. Timed: prompt encoding and the sampling loop (output_type="latent":
no VAE decode, which caching does not touch). Reported per N: seconds per image, speed-up over N = 1 of the same
library, the ratio ours / diffusers, the RMSE of the final latents to the uncached ones of the same library (random
weights: a measure of how far caching moves the result, not of image quality), the max abs difference of ours and
diffusers' latents at that N (the same algorithm: it stays what it is at N = 1, fp32 rounding ~1e-4, or fp16's), and
the peak memory of a call (DeepCache's helper keeps every wrapped block's output, ours one tensor).

The bundled model (`Pipeline()`, 64 x 64 px, trained weights): per prompt, the RMSE in [0, 1] pixels of the images at
each N to the uncached image (same seed), and our seconds per image; only ours (it has no DeepCache package case).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import MMAP_ENV, compare, reexec_with_mmap_threshold, write_report  # noqa: E402
from benchmarks.pipeline import GUIDANCE, PROMPT, SCHEDULERS, build_pair  # noqa: E402

BUNDLED_PROMPTS = ["a red circle above a blue square", "two green stars", "a yellow triangle left of a purple circle",
                   "a small blue square"]  # fmt: skip


def _runners(ours, theirs, args, interval: int, outputs: dict):
    """Two zero-argument calls giving final latents from the same initial latents; each keeps its last output."""
    from DeepCache import DeepCacheSDHelper

    f = ours.vae_scale_factor
    latents = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(1))
    kw = {"num_inference_steps": args.steps, "guidance_scale": GUIDANCE, "height": args.latent * f,
          "width": args.latent * f, "output_type": "latent"}  # fmt: skip
    helper = None
    if interval > 1:
        helper = DeepCacheSDHelper(theirs)
        helper.set_params(cache_interval=interval, cache_branch_id=args.depth)

    def run_ours() -> torch.Tensor:
        out = ours(PROMPT, sampler=args.sampler, latents=latents, progress=False, cache_interval=interval,
                   cache_depth=args.depth, **kw).images  # fmt: skip
        outputs["ours"] = out.float().cpu()
        return out

    def run_theirs() -> torch.Tensor:
        if helper is not None:
            helper.enable()  # wraps the U-Net's blocks, its state afresh
        try:
            out = theirs(PROMPT, latents=latents.to(theirs.device, theirs.unet.dtype), **kw).images
        finally:
            if helper is not None:
                helper.disable()
        outputs["diffusers"] = out.float().cpu()
        return out

    return run_ours, run_theirs


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def bench_sd15(args, device: torch.device, dtype: torch.dtype) -> dict:
    print("building SD 1.5-shaped random weights (diffusers init, ours sharing the tensors)", flush=True)
    ours, theirs = build_pair("sd15", args.sampler, device, dtype)
    if hasattr(theirs.tokenizer, "to_transformers"):  # our tokenizer: diffusers wants transformers' (same ids)
        theirs.tokenizer = theirs.tokenizer.to_transformers()
    small = argparse.Namespace(**{**vars(args), "latent": 8, "steps": 2})
    for fn in _runners(ours, theirs, small, 2, {}):  # warm-up: library initialisation, kernels, the cache path
        fn()
    rows, reference = {}, {}
    for interval in args.intervals:
        outputs: dict[str, torch.Tensor] = {}
        run_ours, run_theirs = _runners(ours, theirs, args, interval, outputs)
        print(f"interval {interval}, depth {args.depth}, {args.steps} steps, latent {args.latent}", flush=True)
        res = compare(f"N={interval}", run_ours, run_theirs, args.reps, device)
        if interval == 1:
            reference = dict(outputs)
        res["rmse_to_uncached"] = {k: _rmse(v, reference[k]) for k, v in outputs.items()} if reference else None
        res["relative_rmse"] = (res["rmse_to_uncached"]["ours"] / reference["ours"].pow(2).mean().sqrt().item()
                                if reference else float("nan"))  # RMSE / RMS of the uncached latents
        res["full_unet_calls"] = math.ceil(args.steps / interval)
        rows[interval] = res
    base = rows.get(1)
    for r in rows.values():
        r["speedup"] = {k: base["time_s"][k] / r["time_s"][k] for k in r["time_s"]} if base else None
    return {str(k): v for k, v in rows.items()}


def bench_bundled(args, device: torch.device) -> dict:
    """Per cache interval N: pixel RMSE to the uncached images and seconds per image; beside each, the uncached run
    with steps / N steps, which costs about as many full U-Net calls (is caching better than fewer steps?)."""
    from pipelines.text_to_image import Pipeline

    pipe = Pipeline(device=device)  # the bundled model, in its default dtype for the device
    pipe("warm-up", num_inference_steps=2, seed=0, progress=False, output_type="np", cache_interval=2)
    steps = args.bundled_steps
    res: dict = {"steps": steps, "sampler": "dpmpp_2m", "depth": args.depth, "branches": pipe.unet.cache_branches,
                 "prompts": args.bundled_prompts, "rows": {}}  # fmt: skip

    def run(name: str, n_steps: int, interval: int) -> None:
        seconds, cpu, images = [], [], []
        for i, prompt in enumerate(args.bundled_prompts):
            t0, c0 = time.perf_counter(), time.process_time()
            out = pipe(prompt, num_inference_steps=n_steps, seed=i, progress=False, output_type="pt",
                       cache_interval=interval, cache_depth=args.depth).images  # fmt: skip
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            images.append(out.float().cpu())
        reference = res.setdefault("_reference", images)
        res["rows"][name] = {"steps": n_steps, "cache_interval": interval,
                             "seconds_per_image": statistics.median(seconds), "cpu_seconds_per_image": statistics.median(cpu),
                             "rmse_to_uncached": [_rmse(a, b) for a, b in zip(images, reference)]}  # fmt: skip
        print(f"bundled {name}: {res['rows'][name]}", flush=True)

    for interval in args.bundled_intervals:
        run(f"cache N={interval}" if interval > 1 else "uncached", steps, interval)
        if interval > 1:
            run(f"uncached, {math.ceil(steps / interval)} steps", math.ceil(steps / interval), 1)
    del res["_reference"]
    return res


def report_md(res: dict) -> str:
    lines = [
        "# DeepCache feature caching: ours vs diffusers + the DeepCache package",
        "",
        (f"device `{res['device']}`, dtype `{res['dtype']}`, torch {res['torch']}, diffusers {res['diffusers']}, "
         f"DeepCache {res['deepcache']}, {res['threads']} threads, sampler `{res['sampler']}`, {res['steps']} steps, "
         f"guidance {GUIDANCE}, cache depth (cache_branch_id) {res['depth']}, {res['reps']} repetitions (median), "
         f"{res['platform']}"),
        "",
        (f"SD 1.5-shaped random weights, latents 4 x {res['latent']} x {res['latent']} (batch 2 with guidance); prompt "
         "encoding + sampling timed (no VAE decode). N = 1: no caching on either side (the reference)."),
        "",
        ("| N | full U-Net calls | ours (s/image) | diffusers + DeepCache (s/image) | time ratio | CPU-time ratio "
         "| ours speed-up | diffusers speed-up | ours RMSE to N=1 (relative) | diffusers RMSE to N=1 "
         "| max abs ours - diffusers | peak MiB ours / diffusers |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in res["sd15"].items():
        t, s, e = r["time_s"], r["speedup"] or {}, r["rmse_to_uncached"] or {}
        lines.append(
            f"| {n} | {r['full_unet_calls']} | {t['ours']:.3f} | {t['diffusers']:.3f} | {r['time_ratio']:.3f} | "
            f"{r['cpu_time_ratio']:.3f} | {s.get('ours', float('nan')):.2f}x | {s.get('diffusers', float('nan')):.2f}x | "
            f"{e.get('ours', float('nan')):.2e} ({r['relative_rmse']:.2f}) | {e.get('diffusers', float('nan')):.2e} | "
            f"{r['max_abs_output_diff']:.1e} | {r['peak_mem_mib']['ours']:.0f} / {r['peak_mem_mib']['diffusers']:.0f} |"
        )
    b = res.get("bundled")
    if b:
        lines += [
            "",
            (f"The bundled model (`Pipeline()`, 64 x 64 px), `{b['sampler']}`, {b['steps']} steps, guidance 7.5, "
             f"depth {b['depth']} of its {b['branches']} branches: pixel RMSE (images in [0, 1]) to the uncached image, "
             "per prompt (seed = prompt index), and our median seconds per image (wall and process CPU) including "
             "the VAE decode. Beside each interval N, the uncached run with steps / N steps: about the same number of "
             "full U-Net calls, so caching is worth it where its RMSE is the lower."),
            "",
            "| run | steps | s/image | CPU s/image | " + " | ".join(f"RMSE: {p}" for p in b["prompts"]) + " |",
            "|---|---|---|---|" + "---|" * len(b["prompts"]),
        ]
        for name, r in b["rows"].items():
            lines.append(f"| {name} | {r['steps']} | {r['seconds_per_image']:.3f} | {r['cpu_seconds_per_image']:.3f} | "
                         + " | ".join(f"{v:.4f}" for v in r["rmse_to_uncached"]) + " |")
    lines += ["", "Peak memory: " + res["memory_method"], ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SCHEDULERS))
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 8 on CPU, 50 on CUDA)")
    p.add_argument("--latent", type=int, default=None, help="latent height = width (default 32 on CPU, 64 on CUDA)")
    p.add_argument("--intervals", type=int, nargs="+", default=None,
                   help="cache intervals; 1 is added (default 1 3 5 on CPU, 1 2 3 5 on CUDA)")
    p.add_argument("--depth", type=int, default=0, help="cache depth, DeepCache's cache_branch_id (default 0)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 1 on CPU, 5 on CUDA)")
    p.add_argument("--quick", action="store_true", help="4 steps, one repetition, two bundled prompts")
    p.add_argument("--skip-sd", action="store_true", help="only the bundled model")
    p.add_argument("--skip-bundled", action="store_true", help="only the SD 1.5-shaped comparison")
    p.add_argument("--bundled-steps", type=int, default=30)
    p.add_argument("--bundled-intervals", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"),
                   help="folder for caching.json and caching.md (caching-cuda.* on CUDA)")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    args.steps = args.steps or (4 if args.quick else 50 if cuda else 8)
    args.latent = args.latent or (64 if cuda else 32)
    args.reps = args.reps or (1 if args.quick or not cuda else 5)
    args.intervals = sorted({1, *(args.intervals or ([1, 2, 3, 5] if cuda else [1, 3, 5]))})
    args.bundled_prompts = BUNDLED_PROMPTS[:2] if args.quick else BUNDLED_PROMPTS
    args.bundled_intervals = sorted({1, *args.bundled_intervals})
    import diffusers
    from importlib.metadata import version

    res = {
        "device": str(device), "dtype": args.dtype, "reps": args.reps, "steps": args.steps, "latent": args.latent,
        "sampler": args.sampler, "depth": args.depth, "intervals": args.intervals, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "deepcache": version("DeepCache"), "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "memory_method": ("torch.cuda.max_memory_allocated during the call minus memory allocated before it" if cuda
                          else f"increase of peak RSS over RSS before the call ({MMAP_ENV}="
                               f"{os.environ.get(MMAP_ENV, 'unset')})"),
    }  # fmt: skip
    with torch.inference_mode():
        if not args.skip_sd:
            res["sd15"] = bench_sd15(args, device, dtype)
        if not args.skip_bundled:
            res["bundled"] = bench_bundled(args, device)
    res.setdefault("sd15", {})
    write_report(args.out, "caching" if device.type == "cpu" else f"caching-{device.type}", res, report_md(res))


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
