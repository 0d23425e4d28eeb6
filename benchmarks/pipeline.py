"""Seconds per image and peak memory of our text-to-image Pipeline against diffusers' StableDiffusionPipeline, on
identical weights, in one run.

    python benchmarks/pipeline.py          # CPU fp32, 2 steps: tiny (9 reps), SD 1.5 shapes at 256 (3 reps), 512 (1 rep),
                                           # SDXL-shaped at 256 (3 reps)
    python benchmarks/pipeline.py --quick  # 1 repetition, no 512 x 512 case (about 3 minutes on 2 shared cores)
    python benchmarks/pipeline.py --device cuda --dtype float16 --steps 30 --compile --peak-tflops 989

Models: the tiny model (ldm/configs/unet-tiny.yaml, ldm/configs/vae-tiny.yaml, a 2-layer CLIP text encoder, 32 x 32 px) and
SD 1.5-shaped random weights (ldm/configs/unet-sd15.yaml, ldm/configs/vae-sd.yaml, a CLIP ViT-L/14-shaped text encoder),
and an SDXL-shaped model against diffusers' StableDiffusionXLPipeline (`sdxl_configs`: SDXL base's block structure,
ldm/configs/unet-sdxl.yaml, at a fifth of its width, 124 M U-Net parameters; two smaller text encoders, the second
with the pooled projection; the SD VAE at scaling 0.13025).
diffusers' modules are built from our configs with their own seeded random initialisation; ours load the very same
tensors by name (strict, `assign=True`), so both pipelines read the same memory. The diffusers scheduler is the one
whose timesteps our sampler walks (euler -> EulerDiscreteScheduler, ...), both get the same initial latents, and the
outputs are compared (max abs pixel difference, in [0, 1]) to show that the two compute the same images.

One image per call, classifier-free guidance 7.5 (U-Net batch 2), full call timed: tokenizer + text encoder +
sampling loop + VAE decode + conversion to a numpy image; wall seconds and process CPU seconds (steadier on a shared
machine) are both reported. Each repetition runs ours and diffusers' back to back,
alternating which goes first; medians over repetitions and the ratios ours / diffusers are reported (<= 1: ours is
as fast or as lean). A 1-step call of each side at a small size warms up first (library initialisation, kernels).

Peak memory (benchmarks/measure.py, shared with the other benchmarks): on CUDA,
torch.cuda.max_memory_allocated during the call minus the memory allocated before it. On CPU, the increase of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs before each call) over its resident size
just before the call, with glibc's mmap threshold fixed at 128 KiB (the script re-executes itself with
MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set and one call's garbage does not hide the next
call's peak. This is the memory the call itself makes resident (activations, temporaries, allocator overhead); the
weights are shared and excluded. The whole process's ru_maxrss is reported too.

On CUDA (or with --peak-tflops), the U-Net's FLOPs per step (one batch-2 forward, counted by
torch.utils.flop_counter.FlopCounterMode) divided by --peak-tflops give an ideal time per image for the sampling
loop, reported against the measured one (the fraction is the model FLOP utilisation of the whole call).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import MMAP_ENV, compare, reexec_with_mmap_threshold, write_report  # noqa: E402

PROMPT = "a red circle above a blue square"
GUIDANCE = 7.5
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
              "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}  # fmt: skip


def model_configs(name: str) -> tuple:
    """(UNetConfig, VAEConfig, CLIPTextConfig, NoiseSchedule) of the "tiny" or "sd15" model."""
    from transformers import CLIPTextConfig

    from autoencoder.model import VAEConfig
    from ldm.config import load_config
    from ldm.networks.unet import UNetConfig
    from ldm.diffusion.schedule import sd_schedule
    from ldm.loading.single_file import SD1_TEXT
    from pipelines.tiny import tiny_text_config

    if name == "tiny":
        unet = load_config(UNetConfig, ROOT / "ldm/configs/unet-tiny.yaml")
        vae = load_config(VAEConfig, ROOT / "ldm/configs/vae-tiny.yaml")
        text = tiny_text_config()
    else:
        unet = load_config(UNetConfig, ROOT / "ldm/configs/unet-sd15.yaml")
        vae = load_config(VAEConfig, ROOT / "ldm/configs/vae-sd.yaml")
        text = CLIPTextConfig(**SD1_TEXT)
    return unet, vae, text, sd_schedule()


def sdxl_configs() -> tuple:
    """(UNetConfig, VAEConfig, text config, text config 2, NoiseSchedule) of the SDXL-shaped model: SDXL base's blocks
    (no attention in the first, transformer depth 1 / 2 / 10, head width 64) at a fifth of the width."""
    import dataclasses

    from transformers import CLIPTextConfig

    from autoencoder.model import VAEConfig
    from ldm.config import load_config
    from ldm.diffusion.schedule import sd_schedule
    from ldm.networks.unet import UNetConfig

    text = dict(vocab_size=49408, num_hidden_layers=6, max_position_embeddings=77)
    text_1 = CLIPTextConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=6, projection_dim=384,
                            hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **text)
    text_2 = CLIPTextConfig(hidden_size=640, intermediate_size=2560, num_attention_heads=10, projection_dim=640,
                            hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1, **text)
    unet = dataclasses.replace(load_config(UNetConfig, ROOT / "ldm/configs/unet-sdxl.yaml"),
                               block_out_channels=(64, 128, 256), attention_head_dim=(1, 2, 4),
                               cross_attention_dim=384 + 640, projection_class_embeddings_input_dim=640 + 6 * 256)
    vae = dataclasses.replace(load_config(VAEConfig, ROOT / "ldm/configs/vae-sd.yaml"), scaling_factor=0.13025)
    return unet, vae, text_1, text_2, sd_schedule()


def build_sdxl_pair(sampler: str, device: torch.device, dtype: torch.dtype):
    """Our Pipeline and diffusers' StableDiffusionXLPipeline over the same weight tensors."""
    import diffusers
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from autoencoder.model import AutoencoderKL
    from ldm.networks.text_sdxl import SDXLPromptEncoder, SDXLTextEncoder
    from ldm.networks.tokenizer import EOS, build_clip_tokenizer
    from ldm.networks.unet import UNet
    from pipelines.text_to_image import Pipeline

    unet_cfg, vae_cfg, text_cfg, text_cfg_2, schedule = sdxl_configs()
    torch.manual_seed(0)
    d_unet = UNet2DConditionModel.from_config(unet_cfg.to_diffusers()).to(device, dtype).eval()
    d_vae = DAutoencoderKL.from_config(vae_cfg.to_diffusers()).to(device, dtype).eval()
    text_1 = CLIPTextModel(text_cfg).to(device, dtype).eval()
    text_2 = CLIPTextModelWithProjection(text_cfg_2).to(device, dtype).eval()
    tok_1, tok_2 = build_clip_tokenizer(EOS), build_clip_tokenizer("!")
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)
    unet.load_state_dict(d_unet.state_dict(), strict=True, assign=True)
    vae.load_state_dict(d_vae.state_dict(), strict=True, assign=True)
    text = SDXLTextEncoder(SDXLPromptEncoder(tok_1, text_1), SDXLPromptEncoder(tok_2, text_2))
    ours = Pipeline(unet, vae, text, schedule, device=device, dtype=dtype)
    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(schedule.to_diffusers())
    theirs = StableDiffusionXLPipeline(vae=d_vae, text_encoder=text_1, text_encoder_2=text_2,
                                       tokenizer=tok_1.to_transformers(), tokenizer_2=tok_2.to_transformers(),
                                       unet=d_unet, scheduler=scheduler, add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def build_pair(name: str, sampler: str, device: torch.device, dtype: torch.dtype):
    """Our Pipeline and diffusers' StableDiffusionPipeline over the same weight tensors."""
    if name == "sdxl":
        return build_sdxl_pair(sampler, device, dtype)
    import diffusers
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from autoencoder.model import AutoencoderKL
    from ldm.networks.text import TextEncoder
    from ldm.networks.tokenizer import EOS, build_clip_tokenizer
    from ldm.networks.unet import UNet
    from pipelines.text_to_image import Pipeline

    unet_cfg, vae_cfg, text_cfg, schedule = model_configs(name)
    torch.manual_seed(0)
    d_unet = UNet2DConditionModel.from_config(unet_cfg.to_diffusers()).to(device, dtype).eval()
    d_vae = DAutoencoderKL.from_config(vae_cfg.to_diffusers()).to(device, dtype).eval()
    text_model = CLIPTextModel(text_cfg).to(device, dtype).eval()
    tokenizer = build_clip_tokenizer(EOS)
    with torch.device("meta"):
        unet, vae = UNet(unet_cfg), AutoencoderKL(vae_cfg)
    unet.load_state_dict(d_unet.state_dict(), strict=True, assign=True)
    vae.load_state_dict(d_vae.state_dict(), strict=True, assign=True)
    ours = Pipeline(unet, vae, TextEncoder(tokenizer, text_model), schedule, device=device, dtype=dtype)
    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(schedule.to_diffusers())
    theirs = StableDiffusionPipeline(vae=d_vae, text_encoder=text_model, tokenizer=tokenizer.to_transformers(), unet=d_unet,
                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def runners(ours, theirs, sampler: str, steps: int, size: int):
    """Two zero-argument calls producing (1, size, size, 3) images in [0, 1] from the same latents and seed."""
    f = ours.vae_scale_factor
    latents = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(1))
    kw = {"num_inference_steps": steps, "guidance_scale": GUIDANCE, "height": size, "width": size, "output_type": "np"}

    def run_ours() -> torch.Tensor:
        out = ours(PROMPT, sampler=sampler, latents=latents, generator=torch.Generator().manual_seed(2),
                   progress=False, **kw)  # fmt: skip
        return torch.from_numpy(out.images)

    def run_theirs() -> torch.Tensor:
        out = theirs(PROMPT, latents=latents.to(theirs.device, theirs.unet.dtype),
                     generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip
        return torch.from_numpy(out.images)

    return run_ours, run_theirs


def unet_flops(ours, size: int) -> int:
    """FLOPs of one guided sampling step: a batch-2 U-Net forward at the latent size."""
    from torch.utils.flop_counter import FlopCounterMode

    f, u = ours.vae_scale_factor, ours.unet
    x = torch.zeros(2, u.config.in_channels, size // f, size // f, device=ours.device, dtype=ours.dtype)
    c = torch.zeros(2, 77, u.config.cross_attention_dim, device=ours.device, dtype=ours.dtype)
    t = torch.full((2,), 500, device=ours.device)
    added = {}
    if u.config.addition_embed_type == "text_time":  # SDXL: pooled embedding and time ids
        pooled = u.config.projection_class_embeddings_input_dim - 6 * u.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(2, pooled, device=ours.device, dtype=ours.dtype),
                 "time_ids": torch.full((2, 6), float(size), device=ours.device, dtype=ours.dtype)}
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        u(x, t, c, **added)
    return int(counter.get_total_flops())


def bench_case(args, name: str, size: int, pair, device: torch.device) -> dict:
    ours, theirs = pair
    run_ours, run_theirs = runners(ours, theirs, args.sampler, args.steps, size)
    reps = max(args.reps, args.tiny_reps) if name == "tiny" else args.reps if size < 512 else args.reps_512
    res = compare(f"{name}@{size}", run_ours, run_theirs, reps, device)
    res.update(model=name, size=size, steps=args.steps, sampler=args.sampler, reps=reps)
    res["seconds_per_image"] = res.pop("time_s")
    if args.peak_tflops or device.type == "cuda":
        flops = unet_flops(ours, size)
        res["unet_flops_per_step"] = flops
        if args.peak_tflops:
            ideal = flops * args.steps / (args.peak_tflops * 1e12)
            res["ideal_unet_seconds"] = ideal
            res["flop_utilisation"] = {k: ideal / v for k, v in res["seconds_per_image"].items()}
    return res


def warm_up(pair, sampler: str) -> None:
    ours, theirs = pair
    small = 8 * ours.vae_scale_factor
    for fn in runners(ours, theirs, sampler, 1, small):
        fn()


def compile_unets(pair) -> None:
    """torch.compile both U-Nets' forward (the pipelines keep calling the modules)."""
    ours, theirs = pair
    ours.unet.forward = torch.compile(ours.unet.forward)
    theirs.unet.forward = torch.compile(theirs.unet.forward)


def report_md(res: dict) -> str:
    lines = [
        "# Text-to-image pipeline: ours vs diffusers' StableDiffusionPipeline (sdxl: StableDiffusionXLPipeline)",
        "",
        (f"device `{res['device']}`, dtype `{res['dtype']}`, torch {res['torch']}, diffusers {res['diffusers']}, "
         f"{res['threads']} threads, sampler `{res['sampler']}`, guidance {GUIDANCE}, {res['reps']} repetitions "
         f"(median; tiny: {res['tiny_reps']}, 512 and up: {res['reps_512']}), compile {res['compile']}, "
         f"{res['platform']}"),
        "",
        ("| model | size | steps | ours (s/image) | diffusers (s/image) | time ratio | CPU-time ratio "
         "| ours peak (MiB) | diffusers peak (MiB) | mem ratio | max abs pixel diff |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res["results"].items():
        if "skipped" in r:
            lines.append(f"| {key} | | | skipped: {r['skipped']} | | | | | | | |")
            continue
        t, m = r["seconds_per_image"], r["peak_mem_mib"]
        lines.append(
            f"| {r['model']} | {r['size']} | {r['steps']} | {t['ours']:.3f} | {t['diffusers']:.3f} | "
            f"{r['time_ratio']:.3f} | {r.get('cpu_time_ratio', float('nan')):.3f} | {m['ours']:.1f} | {m['diffusers']:.1f} | {r['mem_ratio']:.3f} | "
            f"{r['max_abs_output_diff']:.2e} |"
        )
    flop_rows = [(k, r) for k, r in res["results"].items() if "unet_flops_per_step" in r]
    if flop_rows:
        lines += ["", "| case | U-Net GFLOP/step | ideal U-Net s/image | ours utilisation | diffusers utilisation |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for k, r in flop_rows:
            u = r.get("flop_utilisation", {})
            ideal = r.get("ideal_unet_seconds")
            lines.append(f"| {k} | {r['unet_flops_per_step'] / 1e9:.1f} | {'' if ideal is None else f'{ideal:.3f}'} "
                         f"| {u.get('ours', float('nan')):.2%} | {u.get('diffusers', float('nan')):.2%} |")
    lines += ["", "Peak memory: " + res["memory_method"], "",
              f"Whole-process peak RSS (ru_maxrss): {res['process_max_rss_mib']:.0f} MiB", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 2 on CPU, 30 on CUDA)")
    p.add_argument("--sampler", default="euler", choices=sorted(SCHEDULERS))
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per case (default 3)")
    p.add_argument("--tiny-reps", type=int, default=9, help="repetitions for the (noisy, fast) tiny model")
    p.add_argument("--reps-512", type=int, default=None,
                   help="repetitions at 512 x 512 and above (default: 1 on CPU, where one call takes minutes; else --reps)")
    p.add_argument("--quick", action="store_true", help="one repetition, and no SD 1.5 512 x 512 case")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="SD 1.5 image sizes (default 256 512)")
    p.add_argument("--skip-sd", action="store_true", help="no SD 1.5-shaped case")
    p.add_argument("--sdxl-sizes", type=int, nargs="*", default=[256],
                   help="SDXL-shaped image sizes (default 256; none: no SDXL case)")
    p.add_argument("--compile", action="store_true", help="torch.compile both U-Nets")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s in --dtype")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"), help="folder for pipeline.json and pipeline.md")
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.steps = args.steps or (30 if device.type == "cuda" else 2)
    args.reps_512 = args.reps_512 or (1 if device.type == "cpu" else args.reps)
    if args.quick:
        args.reps = 1
        args.sizes = [s for s in args.sizes if s < 512]
    import diffusers

    mem_method = (
        "torch.cuda.max_memory_allocated during the call minus memory allocated before it"
        if device.type == "cuda" else
        "increase of peak RSS (VmHWM, reset through /proc/self/clear_refs) over RSS before the call, with "
        f"{MMAP_ENV}={os.environ.get(MMAP_ENV, 'unset')} so freed tensors leave the resident "
        "set; weights are shared by both pipelines and not counted"
    )
    res = {
        "device": str(device), "dtype": args.dtype, "reps": args.reps, "tiny_reps": max(args.reps, args.tiny_reps),
        "reps_512": args.reps_512, "steps": args.steps, "sampler": args.sampler,
        "compile": args.compile, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(), "platform": platform.platform(), "memory_method": mem_method,
        "results": {},
    }  # fmt: skip
    cases = [("tiny", [32])] + ([] if args.skip_sd else [("sd15", args.sizes)])
    cases += [("sdxl", args.sdxl_sizes)] if args.sdxl_sizes else []
    for name, sizes in cases:
        print(f"building {name} (diffusers init, ours sharing the tensors)", flush=True)
        pair = build_pair(name, args.sampler, device, dtype)
        if args.compile:
            compile_unets(pair)
        warm_up(pair, args.sampler)
        for size in sizes:
            print(f"{name} {size}x{size}, {args.steps} steps", flush=True)
            res["results"][f"{name}@{size}"] = bench_case(args, name, size, pair, device)
        del pair
    res["process_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_report(args.out, "pipeline", res, report_md(res))


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
