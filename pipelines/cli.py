"""The `ldm` command line: generate, convert, info, train, export (see docs/cli.md).

Every command returns an exit code: 0 on success, 2 for bad input (a one-line `ldm: error: ...` on stderr, no
traceback, no partial output file), 1 when the machine fails it (a full disk) or for a bug (with its traceback);
`ldm --debug COMMAND` shows the traceback of every error (pipelines/cli_common.py). Heavy imports (torch, the models)
happen inside the commands, so `ldm --help` stays quick. `generate` lives in pipelines/cli_generate.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pipelines.cli_common import EXIT_OK, EXIT_USAGE, UsageError, load_model, report
from pipelines.cli_generate import add_generate_parser, cmd_generate
from pipelines.image_files import output_paths  # noqa: F401 - re-exported: where the files of -n N go

DTYPES = ("float32", "float16", "bfloat16", "float64")
DTYPE_ALIASES = ("fp32", "fp16", "bf16", "fp64")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        print(f"ldm: error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


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
    c = load_model(str(src), args.allow_pickle, args.prediction_type, config=args.model_config)
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
    from ldm.networks.text_sdxl import SDXLTextEncoder

    c = components
    texts = {"text_encoder": c.text_encoder}
    if isinstance(c.text_encoder, SDXLTextEncoder):  # SDXL: two encoders (the refiner: the second alone)
        texts = {k: e for k, e in (("text_encoder", c.text_encoder.text_encoder),
                                   ("text_encoder_2", c.text_encoder.text_encoder_2)) if e is not None}

    def count(m: Any) -> int:
        return sum(p.numel() for p in m.parameters())

    def dtype(m: Any) -> str:
        return str(next(m.parameters()).dtype).removeprefix("torch.")

    info = {
        "unet": {"class": type(c.unet).__name__, "parameters": count(c.unet), "dtype": dtype(c.unet),
                 "config": c.unet.config.to_diffusers()},
        "vae": {"class": type(c.vae).__name__, "parameters": count(c.vae), "dtype": dtype(c.vae),
                "config": c.vae.config.to_diffusers()},
        **{name: {"class": type(text.model).__name__, "parameters": count(text.model), "dtype": dtype(text.model),
                  "hidden_size": text.hidden_size, "pad_token": text.tokenizer.pad_token,
                  "config": {k: v for k, v in text.model.config.to_dict().items() if not k.startswith("_")}}
           for name, text in texts.items()},
        "schedule": c.schedule.to_diffusers(),
    }
    info["total_parameters"] = sum(info[k]["parameters"] for k in ("unet", "vae", *texts))
    return info


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(load_model(args.model, args.allow_pickle, config=args.model_config))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    print(f"model: {args.model}")
    print(f"total parameters: {info['total_parameters']:,}")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name not in info:
            continue
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
    from ldm.training.export import export, export_lora

    if args.lora:
        if args.vae:
            raise UsageError("--vae ships a VAE with a pipeline folder; a --lora export holds the LoRA alone")
        out = export_lora(args.checkpoint, args.out_dir, format=args.format, use_ema=not args.no_ema,
                          overwrite=args.overwrite)
        print(f"wrote {out} (LoRA, {args.format} layout)")
        return EXIT_OK
    vae = AutoencoderKL.from_pretrained(args.vae) if args.vae else None
    out = export(args.checkpoint, args.out_dir, use_ema=not args.no_ema, vae=vae, vae_name=f"--vae {args.vae}",
                 overwrite=args.overwrite)
    print(f"wrote {out}")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ldm", description="Latent diffusion text-to-image: generate, convert, inspect, train, export.")
    p.add_argument("--debug", action="store_true", help="show the traceback of any error (before the COMMAND)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    add_generate_parser(sub, DTYPES + DTYPE_ALIASES)

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

    e = sub.add_parser("export", help="training checkpoint -> pipeline folder (or, with --lora, a LoRA file)")
    e.add_argument("checkpoint", help="a checkpoint folder, RUN/checkpoints/latest, or a run folder (its latest)")
    e.add_argument("out_dir", help="the pipeline folder to write; with --lora, the .safetensors file")
    e.add_argument("--lora", action="store_true", help="a LoRA run: write its LoRA alone as one .safetensors file")
    e.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"],
                   help="--lora's key layout: diffusers/peft (diffusers' load_lora_weights) or kohya/A1111")
    e.add_argument("--overwrite", action="store_true", help="replace OUT even if it holds other files")
    e.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    e.add_argument("--vae", default=None, help="a diffusers vae/ folder to ship instead of the training VAE; it must "
                   "encode exactly as that one (e.g. a decoder-only fine-tune, ldm.training.vae train_encoder=false)")
    e.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ldm` console script. Run as that script, `ldm generate` leaves through `exit_now` once its
    images are written; called from Python, main returns the exit code."""
    code, func = _main(argv)
    if func is cmd_generate and argv is None and _is_console_script():
        exit_now(code)
    return code


def _main(argv: list[str] | None) -> tuple[int, Callable[[argparse.Namespace], int] | None]:
    """The exit code and the command that ran (None when the arguments were refused)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(argv) and argv[0] == "--debug"
    try:
        if argv[debug:debug + 1] == ["train"]:  # ldm.training.unet owns its arguments, --help included
            return _run(cmd_train, argparse.Namespace(train_args=argv[debug + 1:], debug=debug)), cmd_train
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE), None
    return _run(args.func, args), args.func


def _is_console_script() -> bool:
    """True in the `ldm` script pip writes (`from pipelines.cli import main; sys.exit(main())`), false when main is
    imported and called by other code (tests, a user's script)."""
    script = sys.modules.get("__main__")
    return Path(getattr(script, "__file__", None) or "").name == "ldm" and getattr(script, "main", None) is main


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown (freeing every module and object: ~0.1-0.8 s after
    generating, issue 32). Only for a finished command: its files are written and closed (atomic replaces), so the
    kernel holds them whatever the exit; atexit handlers still run (logging's flush among them) and stdout/stderr
    are flushed; then os._exit."""
    import atexit
    import os

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (ldm ... | head) or a closed stream: nothing left to save
                pass
        os._exit(code)


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; an error becomes its line on stderr and exit code (pipelines.cli_common.report)."""
    try:
        return func(args)
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error leaves through report: one line, or a bug's traceback
        return report(e, debug=getattr(args, "debug", False))


if __name__ == "__main__":  # python -m pipelines.cli: as the console script
    _code, _func = _main(None)
    if _func is cmd_generate:
        exit_now(_code)
    raise SystemExit(_code)
