"""The `ldm` command line: generate, convert, info, train, export (see docs/cli.md).

Every command returns an exit code: 0 on success, 2 for bad input (a one-line `ldm: error: ...` on stderr, no
traceback, no partial output file). Heavy imports (torch, the models) happen inside the commands, so `ldm --help`
stays quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pipelines.image_files import image_format, image_grid, output_paths, save_image_atomic

EXIT_OK, EXIT_USAGE = 0, 2
DTYPES = ("float32", "float16", "bfloat16", "float64")


class UsageError(Exception):
    """Bad input from the command line: reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        print(f"ldm: error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# ------------------------------------------------------------------------------------------------------- helpers


def _one_line(e: BaseException) -> str:
    """The message on one line (a KeyError's quotes and any newlines removed)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split()) or type(e).__name__


def _torch_dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _device(name: str | None) -> Any:
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"bad --device {name!r}: {_one_line(e)}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


def _load(model: str | None, allow_pickle: bool, prediction_type: str | None = None,
          config: str | None = None) -> Any:
    """Components from a folder, a single file (with `config`, a pipeline folder whose configs fit it) or a hub name
    (default: the bundled model)."""
    from ldm.loading.sources import DEFAULT_MODEL, load_components
    from ldm.loading.single_file import load_single_file

    path = Path(model).expanduser() if model is not None else DEFAULT_MODEL
    if prediction_type is not None and path.is_file():
        return load_single_file(path, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                config_folder=config)
    components = load_components(path if model is None else model, allow_pickle=allow_pickle, config=config)
    if prediction_type is not None:
        from ldm.diffusion.schedule import NoiseSchedule

        data = {**components.schedule.to_diffusers(), "prediction_type": prediction_type}
        components.schedule = NoiseSchedule.from_diffusers(data)
    return components


# ------------------------------------------------------------------------------------------------------ generate


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt.strip()
    if not prompt:
        raise UsageError('the prompt is empty: give the text to draw, e.g. ldm generate "a red circle" -o out.png')
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} must be a positive multiple of the model's VAE factor (8 for SD, 4 for the "
                             f"bundled model), got {v}")
    if args.image is None and args.strength is not None:
        raise UsageError("--strength needs --image (image-to-image)")
    if args.strength is not None and not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    out = Path(args.output)
    image_format(out)  # an unwritable suffix is refused before the model loads
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    init = None
    if args.image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(args.image) as im:
                init = im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise UsageError(f"cannot read --image {args.image}: {_one_line(e)}") from e

    import torch

    from pipelines.text_to_image import Pipeline

    device = _device(args.device)
    c = _load(args.model, args.allow_pickle, config=args.model_config)
    pipe = Pipeline(c.unet, c.vae, c.text_encoder, c.schedule, device=device, dtype=_torch_dtype(args.dtype))
    kwargs: dict[str, Any] = {}
    if init is not None:
        kwargs.update(image=init, strength=0.8 if args.strength is None else args.strength)
    with torch.inference_mode():
        result = pipe(
            prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            guidance_rescale=args.guidance_rescale,
            guidance_interval=args.guidance_interval,
            sampler=args.sampler,
            height=args.height,
            width=args.width,
            seed=args.seed,
            num_images_per_prompt=args.num_images,
            progress=not args.no_progress,
            **kwargs,
        )
    images = result.images
    if args.grid and len(images) > 1:
        save_image_atomic(image_grid(images, args.grid_cols), out)
        print(f"wrote {out} ({len(images)} images, seeds {' '.join(map(str, result.seeds))})")
        return EXIT_OK
    for path, image, seed in zip(output_paths(out, len(images)), images, result.seeds, strict=True):
        save_image_atomic(image, path)
        print(f"wrote {path} (seed {seed})")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from ldm.loading.components import save_pipeline
    from ldm.loading.single_file import save_single_file

    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if not src.exists():
        raise UsageError(f"no model folder or checkpoint file at {src}")
    if src.resolve() == dst.resolve():
        raise UsageError(f"source and destination are the same path: {src}")
    if dst.exists() and not args.overwrite:
        raise UsageError(f"{dst} exists: pass --overwrite to replace it")
    to_file = dst.suffix == ".safetensors"
    if not to_file and dst.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        raise UsageError(f"{dst.name}: single files are written as .safetensors only (pickle is never written)")
    c = _load(str(src), args.allow_pickle, args.prediction_type, config=args.model_config)
    if to_file:
        save_single_file(c, dst)
    else:
        save_pipeline(dst, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule,
                      scheduler_config=c.scheduler_config, overwrite=args.overwrite)
    print(f"wrote {dst} ({'single file' if to_file else 'pipeline folder'})")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------------- info


def model_info(components: Any) -> dict[str, Any]:
    """Component classes, parameter counts and configs (diffusers' key names) of loaded components."""
    c = components
    text = c.text_encoder
    text_cfg = {k: v for k, v in text.model.config.to_dict().items() if not k.startswith("_")}

    def count(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    def dtype(m: Any) -> str:
        return str(next(m.parameters()).dtype).removeprefix("torch.")

    info = {
        "unet": {"class": type(c.unet).__name__, "parameters": count(c.unet), "dtype": dtype(c.unet),
                 "config": c.unet.config.to_diffusers()},
        "vae": {"class": type(c.vae).__name__, "parameters": count(c.vae), "dtype": dtype(c.vae),
                "config": c.vae.config.to_diffusers()},
        "text_encoder": {"class": type(text.model).__name__, "parameters": count(text.model),
                         "dtype": dtype(text.model), "hidden_size": text.hidden_size,
                         "pad_token": text.tokenizer.pad_token, "config": text_cfg},
        "schedule": c.schedule.to_diffusers(),
    }
    info["total_parameters"] = sum(info[k]["parameters"] for k in ("unet", "vae", "text_encoder"))
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(_load(args.model, args.allow_pickle, config=args.model_config))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    print(f"model: {args.model}")
    print(f"total parameters: {info['total_parameters']:,}")
    for name in ("unet", "vae", "text_encoder"):
        part = info[name]
        print(f"\n[{name}] {part['class']}, {part['parameters']:,} parameters, {part['dtype']}")
        for k, v in part["config"].items():
            if not k.startswith("_"):
                print(f"  {k}: {v}")
    print("\n[schedule]")
    for k, v in info["schedule"].items():
        print(f"  {k}: {v}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ train, export


def cmd_train(args: argparse.Namespace) -> int:
    from ldm.training.unet import main as train_main

    return int(train_main(list(args.train_args)) or 0)


def cmd_export(args: argparse.Namespace) -> int:
    from autoencoder.model import AutoencoderKL
    from ldm.training.export import export

    vae = AutoencoderKL.from_pretrained(args.vae) if args.vae else None
    out = export(args.checkpoint, args.out_dir, use_ema=not args.no_ema, vae=vae, vae_name=f"--vae {args.vae}",
                 overwrite=args.overwrite)
    print(f"wrote {out}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ldm", description="Latent diffusion text-to-image: generate, convert, inspect, train, export.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser("generate", help="text (or image) to image", description="Generate images from a prompt.")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("-o", "--output", default="out.png", help="output image (default out.png); more images: out-1.png ...")
    g.add_argument("--model", default=None, help="pipeline folder, .safetensors file or hub name (default: bundled)")
    g.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    g.add_argument("--guidance-rescale", type=float, default=0.0, help="guidance rescale phi (default 0)")
    g.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only at noise levels LO < sigma <= HI (default: every step)")
    g.add_argument("--sampler", default="dpmpp_2m",
                   help="a name of ldm.diffusion.samplers.SAMPLERS (an unknown name lists them); default dpmpp_2m")
    g.add_argument("--seed", type=int, default=None, help="seed of the first image (image i gets seed + i)")
    g.add_argument("--negative-prompt", default=None, help="replaces the empty prompt of guidance")
    g.add_argument("--height", type=int, default=None, help="pixels, a multiple of the model's VAE factor: 8 for SD, 4 for the "
                   "bundled model (default: the model's trained size)")
    g.add_argument("--width", type=int, default=None, help="pixels, as --height (default: the model's trained size)")
    g.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    g.add_argument("--grid", action="store_true", help="write all images as one grid to OUTPUT")
    g.add_argument("--grid-cols", type=int, default=None, help="grid columns (default ceil(sqrt(n)))")
    g.add_argument("--image", default=None, help="init image: image-to-image")
    g.add_argument("--strength", type=float, default=None, help="img2img noise strength in (0, 1] (default 0.8)")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (.ckpt, .bin)")
    g.add_argument("--model-config", default=None, metavar="FOLDER", help="for a single-file --model of another size: a pipeline folder whose configs fit it")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core); 1 keeps "
                   "a small model fast while other programs are busy (docs/cli.md, 'Threads')")
    g.add_argument("--dtype", default=None, choices=DTYPES, help="default float16 on CUDA, float32 on CPU")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="single file <-> pipeline folder",
                       description="Convert a model: DST ending in .safetensors -> single file, else a folder.")
    c.add_argument("src", help="pipeline folder or single-file checkpoint")
    c.add_argument("dst", help="*.safetensors for a single file, anything else for a folder")
    c.add_argument("--allow-pickle", action="store_true", help="allow reading pickle checkpoints (.ckpt)")
    c.add_argument("--model-config", default=None, metavar="FOLDER", help="for a single-file SRC of another size: a "
                   "pipeline folder whose configs fit it")
    c.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="override the schedule's prediction type (e.g. SD 2.x 512 base: epsilon)")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="components, parameter counts and configs of a model")
    i.add_argument("model", help="pipeline folder, .safetensors file or hub name")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--allow-pickle", action="store_true")
    i.add_argument("--model-config", default=None, metavar="FOLDER", help="for a single-file --model of another size: a pipeline folder whose configs fit it")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train or fine-tune (forwards to ldm.training.unet)", add_help=False,
                       description="All arguments go to ldm.training.unet: ldm train --config train-tiny.yaml ...")
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="training checkpoint -> pipeline folder")
    e.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its latest checkpoint)")
    e.add_argument("out_dir")
    e.add_argument("--overwrite", action="store_true", help="replace OUT even if it holds other files")
    e.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    e.add_argument("--vae", default=None, help="a diffusers vae/ folder to ship instead of the training VAE; it must "
                   "encode exactly as that one (e.g. a decoder-only fine-tune, ldm.training.vae train_encoder=false)")
    e.set_defaults(func=cmd_export)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (missing files, bad weights/configs/sizes), not a bug."""
    return (UsageError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ldm` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "train":  # ldm.training.unet owns its arguments, --help included
            return _run(cmd_train, argparse.Namespace(train_args=argv[1:]))
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    return _run(args.func, args)


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; bad input becomes one stderr line and exit code 2."""
    try:
        return func(args)
    except _user_errors() as e:
        print(f"ldm: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
