"""`ldm generate`: its arguments, checked before the model loads, and images written batch by batch as they are done.

Every option goes through pipelines.call_options.check_call_options, the function `Pipeline.__call__` runs, with the
messages in the CLI's names (`--steps must be an integer in [1, 1000], got 0`), before the model is loaded; what
depends on the model (sizes a multiple of its VAE factor, steps <= its schedule's training steps, --cache-depth below
its branches) is checked after loading, before any network runs. `--num-images N` runs in batches of at most
MAX_BATCH images, fewer where the memory estimate (pipelines.memory) says so, each batch's files written before the
next batch starts; a size whose single image cannot fit is refused with the estimate. `-o` names an image file: an
existing one is replaced (as image tools do: the printed seed makes it again), a folder is refused.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from pipelines.cli_common import EXIT_OK, UsageError, load_model, one_line
from pipelines.image_files import (
    image_format,
    image_grid,
    output_path,
    save_image_atomic,
)

MAX_BATCH = 8  # images per network call at most: bounded work between written files
CLI_FLAGS = {  # Pipeline.__call__'s option names -> the flags of `ldm generate`, for messages
    "prompt": "the prompt", "negative_prompt": "--negative-prompt", "num_inference_steps": "--steps",
    "guidance_scale": "--guidance", "guidance_rescale": "--guidance-rescale", "guidance_interval": "--guidance-interval",
    "sampler": "--sampler", "height": "--height", "width": "--width", "seed": "--seed",
    "num_images_per_prompt": "--num-images", "strength": "--strength", "sigma_schedule": "--sigma-schedule",
    "eta": "--eta", "cache_interval": "--cache-interval", "cache_depth": "--cache-depth", "device": "--device",
    "dtype": "--dtype", "threads": "--threads", "grid_cols": "--grid-cols", "mask_image": "--mask",
    "clip_skip": "--clip-skip", "prompt_syntax": "--emphasis", "noise_level": "--noise-level",
    "upscale_steps": "--upscale-steps", "upscale_strength": "--upscale-strength",
    "clip_guidance_scale": "--clip-guidance", "clip_prompt": "--clip-prompt",
}


def add_generate_parser(sub: Any, dtypes: tuple[str, ...]) -> None:
    g = sub.add_parser("generate", help="text (or image) to image", description="Generate images from a prompt.")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("-o", "--output", default="out.png", help="output image, replaced if it exists (default out.png); "
                   "more images: out-1.png ...")
    g.add_argument("--model", default=None, help="pipeline folder, .safetensors file or hub name (default: bundled)")
    g.add_argument("--steps", type=int, default=None,
                   help="sampling steps, 1-1000 (default: 10 for the bundled model, 30 for others)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale, 0-100 (default 7.5)")
    g.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi, 0-1 (default 0)")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels LO < sigma <= HI (default: every step)")
    g.add_argument("--cache-interval", type=int, default=None, metavar="N", help="DeepCache: run the U-Net in full "
                   "every N-th call, reusing its deep features in between (default: off; 3 is DeepCache's)")
    g.add_argument("--cache-depth", type=int, default=0, metavar="D", help="DeepCache's skip branch (cache_branch_id): "
                   "0 (default) caches the most and is fastest; higher keeps more of the U-Net live")
    g.add_argument("--sampler", default=None,
                   help="a name of ldm.diffusion.samplers.SAMPLERS (an unknown name lists them); default: euler for "
                        "the bundled model, dpmpp_2m for others")
    g.add_argument("--eta", type=float, default=None, help="noise of ancestral and SDE samplers, 0-1 (ddim, "
                   "euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde, dpmpp_2s_ancestral; default: the sampler's)")
    g.add_argument("--sigma-schedule", default=None, metavar="NAME",
                   help="where the steps fall: default, karras, exponential, sgm_uniform, ays_sd15, ays_sdxl "
                   "(default: the model's scheduler config)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the first image, an integer in [0, 2**64) (image i gets seed + i)")
    g.add_argument("--negative-prompt", default=None, help="replaces the empty prompt of guidance")
    g.add_argument("--emphasis", action="store_true", help='read "(word:1.3)", "(word)" (x1.1), "[word]" (/1.1), '
                   '"\\(" and BREAK as AUTOMATIC1111 does (default: every character is prompt text, as diffusers)')
    g.add_argument("--clip-skip", type=int, default=None, metavar="K", help="read the text encoder K layers before "
                   "its last, as diffusers' clip_skip (1: the penultimate layer; default: the model's)")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of the model's VAE factor: 8 for SD, "
                   "4 for the bundled model (default: the model's trained size)")
    g.add_argument("--width", type=int, default=None, help="pixels, as --height (default: the model's trained size)")
    g.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1), in batches of "
                   f"at most {MAX_BATCH}, each written when done")
    g.add_argument("--grid", action="store_true", help="write all images as one grid to OUTPUT")
    g.add_argument("--grid-cols", type=int, default=None, help="grid columns, 1 to N (default ceil(sqrt(N)))")
    g.add_argument("--image", default=None, help="init image: image-to-image")
    g.add_argument("--strength", type=float, default=None, help="img2img noise strength in (0, 1] (default 0.8; "
                   "1.0 with --mask)")
    g.add_argument("--mask", default=None, metavar="PATH", help="inpainting mask for --image, of its size: white "
                   "repaints, black keeps (docs/inpainting.md)")
    g.add_argument("--upscale", nargs="?", const="default", default=None, metavar="FOLDER", help="then upscale each "
                   "image with this StableDiffusionUpscalePipeline folder, e.g. the x4 upscaler; no FOLDER: the "
                   "bundled model's 64 -> 256 stage (a cascade: docs/cascade.md)")
    g.add_argument("--noise-level", type=int, default=None, help="with --upscale: the noise level of the low-res "
                   "image, 0 to the upscaler's max_noise_level (default: the bundled stage's own, docs/cascade.md; "
                   "20 for other folders)")
    g.add_argument("--upscale-steps", type=int, default=None, help="with --upscale: the upscaler's sampling steps "
                   "(default: the bundled stage's, 30 for other folders)")
    g.add_argument("--upscale-strength", type=float, default=None, metavar="S", help="with --upscale: in (0, 1]; below "
                   "1 the upscaler starts from the image upsampled, noised to this strength (default: the bundled "
                   "stage's, docs/cascade.md; 1.0, from noise, for other folders)")
    g.add_argument("--clip-guidance", type=float, default=0.0, metavar="S", help="CLIP guidance scale with the "
                   "model's noise-aware CLIP (its noisy_clip/ folder; docs/guidance.md), >= 0 (default 0: off)")
    g.add_argument("--clip-prompt", default=None, help="with --clip-guidance: what it guides toward (default: the "
                   "prompt; needed for the empty prompt)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="apply a LoRA file "
                   "(diffusers/peft or kohya/A1111 layout) at SCALE (default 1); repeatable (docs/lora.md)")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (.ckpt, .bin)")
    g.add_argument("--model-config", default=None, metavar="FOLDER", help="for a single-file --model of another size: "
                   "a pipeline folder whose configs fit it")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core); 1 keeps "
                   "a small model fast while other programs are busy (docs/cli.md, 'Threads')")
    g.add_argument("--dtype", default=None, choices=dtypes,
                   help="default float16 on CUDA; on a CPU bfloat16 where it has native bf16 (AVX-512 BF16 or "
                        "AMX: about 0.6x the fp32 time, adherence unchanged), else float32")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.call_options import OptionError

    try:
        return _generate(args)
    except OptionError as e:
        raise UsageError(e.message(CLI_FLAGS)) from e


def _generate(args: argparse.Namespace) -> int:
    from pipelines.call_options import (
        check_call_options,
        check_device,
        check_dtype,
        check_float,
        check_int,
    )
    from pipelines.memory import MemoryEstimateError

    # 1. everything that needs no model
    prompt = args.prompt.strip()
    if not prompt:
        raise UsageError('the prompt is empty: give the text to draw, e.g. ldm generate "a red circle" -o out.png')
    if args.image is None and args.strength is not None:
        raise UsageError("--strength needs --image (image-to-image)")
    if args.image is None and args.mask is not None:
        raise UsageError("--mask needs --image (the image to inpaint)")
    n = check_int("num_images_per_prompt", args.num_images, 1)
    check_float("clip_guidance_scale", args.clip_guidance, 0.0, float("inf"))
    if args.noise_level is not None:  # its upper bound is the upscaler's, checked once it is loaded
        check_int("noise_level", args.noise_level, 0)
    if args.upscale_steps is not None:
        check_int("upscale_steps", args.upscale_steps, 1, 1000)
    if args.upscale_strength is not None:
        check_float("upscale_strength", args.upscale_strength, 0.0, 1.0, low_open=True)
    if args.upscale is None and (args.noise_level, args.upscale_steps, args.upscale_strength) != (None, None, None):
        raise UsageError("--noise-level, --upscale-steps and --upscale-strength need --upscale")
    if args.upscale is not None and args.image is not None:
        raise UsageError("--upscale upscales generated images; --image (image-to-image) cannot be combined with it")
    opts = check_call_options(
        prompt, args.negative_prompt, args.steps, args.guidance, args.guidance_rescale, args.guidance_interval,
        args.sampler, args.height, args.width, args.seed, n, args.strength, sigma_schedule=args.sigma_schedule,
        eta=args.eta, cache_interval=args.cache_interval, cache_depth=args.cache_depth, img2img=args.image is not None,
        inpaint=args.mask is not None, clip_skip=args.clip_skip, prompt_syntax="a1111" if args.emphasis else "plain")
    if args.grid_cols is not None:
        if not args.grid:
            raise UsageError("--grid-cols needs --grid")
        check_int("grid_cols", args.grid_cols, 1, n, note=" (at most --num-images)")
    threads = None if args.threads is None else check_int("threads", args.threads, 1)
    loras = _loras(args.lora)
    device, dtype = check_device(args.device), check_dtype(args.dtype)
    out = _output(Path(args.output).expanduser())
    init = _init_image(args.image)
    mask = _init_image(args.mask, "--mask", None)  # its own mode: pipelines.inpaint reads any as grey
    size = (opts.height, opts.width) if init is None or (opts.height and opts.width) else init.size[::-1]
    if size[0] is not None and size[1] is not None:
        _check_floor(size[0], size[1], n if args.grid else 1)

    # 2. the model
    import torch

    from ldm.loading.sources import sampling_defaults
    from pipelines.clip_guidance import model_folder
    from ldm.random import SEED_SPACE
    from pipelines.text_to_image import Pipeline

    if threads is not None:
        torch.set_num_threads(threads)
    c = load_model(args.model, args.allow_pickle, config=args.model_config)
    pipe = Pipeline(c.unet, c.vae, c.text_encoder, c.schedule, device=device, dtype=dtype)
    pipe.sampling_defaults = sampling_defaults(args.model or "default")
    pipe.model_folder = model_folder(args.model or "default")  # its noisy_clip/, read if --clip-guidance uses it
    for path, scale in loras:  # every key checked (pipelines.lora)
        pipe.load_lora(path, scale, allow_pickle=args.allow_pickle)
    run: Any = pipe  # with --upscale: a cascade, the base stage's batches upscaled as they are done
    if args.upscale is not None:
        from pipelines.cascade import Cascade
        from pipelines.upscaler import Upscaler

        upscaler = Upscaler.from_pretrained(args.upscale, device=pipe.device, dtype=pipe.dtype)
        level = None if args.noise_level is None else upscaler.check_noise_level(args.noise_level)
        run = functools.partial(Cascade(pipe, upscaler), noise_level=level, upscale_steps=args.upscale_steps,
                                upscale_strength=args.upscale_strength)

    # 3. what depends on it: the size, then the batch the memory estimate allows
    trained = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = (size[0] or trained, size[1] or trained)
    if size != (height, width):
        _check_floor(height, width, n if args.grid else 1)
    guided = not (opts.guidance_scale == 1.0 and opts.guidance_rescale == 0.0)
    batch = _batch_size(pipe, height, width, n, guided=guided, img2img=init is not None)
    if batch < 1:
        raise MemoryEstimateError(_memory_message(pipe, height, width, init is not None))

    # 4. the batches, each written when done
    kwargs: dict[str, Any] = {
        "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps, "sampler": args.sampler,
        "guidance_scale": opts.guidance_scale, "guidance_rescale": opts.guidance_rescale,
        "guidance_interval": opts.guidance_interval, "sigma_schedule": args.sigma_schedule, "eta": opts.eta,
        "cache_interval": args.cache_interval, "cache_depth": args.cache_depth, "height": args.height,
        "width": args.width, "progress": not args.no_progress, "clip_skip": opts.clip_skip,
        "prompt_syntax": opts.prompt_syntax}
    if args.clip_guidance or args.clip_prompt is not None:  # pipelines.clip_guidance
        kwargs.update(clip_guidance_scale=args.clip_guidance, clip_prompt=args.clip_prompt)
    if init is not None:
        kwargs.update(image=init, mask_image=mask, strength=opts.strength)
    tiles: list[Any] = []
    seeds: list[int] = []
    with torch.inference_mode(not args.clip_guidance):  # CLIP guidance takes a gradient
        for start in range(0, n, batch):
            seed = None if opts.seed is None else (opts.seed + start) % SEED_SPACE
            result = run(prompt, seed=seed, num_images_per_prompt=min(batch, n - start), **kwargs)
            if args.grid and n > 1:
                tiles += result.images
                seeds += result.seeds
                continue
            for i, (image, s) in enumerate(zip(result.images, result.seeds, strict=True)):
                path = output_path(out, start + i)
                save_image_atomic(image, path)
                print(f"wrote {path} (seed {s})", flush=True)
    if tiles:
        save_image_atomic(image_grid(tiles, args.grid_cols), out)
        print(f"wrote {out} ({len(tiles)} images, seeds {' '.join(map(str, seeds))})", flush=True)
    return EXIT_OK


def _loras(specs: list[str]) -> list[tuple[Path, float]]:
    """--lora PATH[:SCALE] options, checked before the model loads."""
    from pipelines.lora import parse_lora_option

    try:
        return [parse_lora_option(spec) for spec in specs]
    except ValueError as e:
        raise UsageError(str(e)) from e


def _output(out: Path) -> Path:
    """-o: an image file name whose folder exists (an existing file is replaced); a folder is refused."""
    if out.is_dir():
        raise UsageError(f"-o {out} is a folder: give an image file name, e.g. -o {out / 'out.png'}")
    image_format(out)  # an unwritable suffix is refused before the model loads
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    return out


def _init_image(path: str | None, flag: str = "--image", mode: str | None = "RGB") -> Any:
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode) if mode else im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise UsageError(f"cannot read {flag} {path}: {one_line(e)}") from e


def _check_floor(height: int, width: int, images: int) -> None:
    """What the images need whatever the model (the decoded float32 image and its 8-bit copy, in the computer's
    memory; for a grid all of them at once) against what it has available: refused before the model loads."""
    from pipelines.memory import check_fits, floor_bytes

    what = f"--height {height} --width {width}" + (f" as a grid of {images} images" if images > 1 else "")
    check_fits(floor_bytes(images, height, width), "cpu", what,
               "lower --height and --width" + (" or --num-images" if images > 1 else ""),
               "at least the decoded images themselves")


def _batch_size(pipe: Any, height: int, width: int, n: int, *, guided: bool, img2img: bool) -> int:
    """The most images per call, up to MAX_BATCH and n, whose estimate fits half the memory available (the other
    half left to the rest of the machine), at least one if one fits at all; 0 if not even one fits."""
    from pipelines.memory import available_bytes

    found = available_bytes(pipe.device) if pipe.memory_check else None
    if found is None:
        return min(MAX_BATCH, n)
    fits = [b for b in range(1, min(MAX_BATCH, n) + 1)
            if pipe.memory_estimate(height, width, b, guided=guided, img2img=img2img).total <= found[0] / 2]
    if fits:
        return fits[-1]
    return 1 if pipe.memory_estimate(height, width, 1, guided=guided, img2img=img2img).total <= found[0] else 0


def _memory_message(pipe: Any, height: int, width: int, img2img: bool) -> str:
    from pipelines.memory import available_bytes, format_bytes

    estimate = pipe.memory_estimate(height, width, 1, img2img=img2img)
    have, source = available_bytes(pipe.device) or (0, "available")
    return (f"--height {height} --width {width}: one image needs about {format_bytes(estimate.total)} of memory "
            f"(estimate: {estimate.describe()}), but {format_bytes(have)} is {source}: lower --height and --width")
