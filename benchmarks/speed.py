"""Faster than diffusers at equal quality: seconds per image, peak memory and quality of four configurations, in one
interleaved run — diffusers' default, the best diffusers configuration a user could assemble (a faster dtype, its
best scheduler at fewer steps, the DeepCache package), our default and our best.

    python benchmarks/speed.py                      # CPU: the bundled model, then SD 1.5 shapes at 128 px
    python benchmarks/speed.py --skip-sd            # the bundled model only (about 3 minutes on 2 cores)
    python benchmarks/speed.py --device cuda --skip-bundled --size 512   # the GPU row set (fp16)

Models. "bundled": the bundled default model (pipelines/default_model, 64 x 64 px), loaded by both libraries from
the same folder; quality is prompt adherence scored by the analytic detector (ldm.shapes.detect; GenEval-style,
the prompt sets of benchmarks/quality.py, seed i for prompt i, the same seeds in every row), single-object and
two-object all-correct rates. "sd15": SD 1.5-shaped random weights shared by both libraries (benchmarks/pipeline.py's
build_pair); random weights draw no picture, so quality there is the RMSE of the final latents to a 100-step fp32
DPM-Solver++(2M) reference from the same initial noise: how far a configuration's discretisation, precision and
caching move the result.

Timing: one prompt per call, classifier-free guidance 7.5, the whole call (text encoder, sampling loop, VAE decode,
numpy image); every row runs once per repetition, in rotating order, medians reported; peak memory as
benchmarks/measure.py measures it (the call's own, weights excluded). The ratio columns divide by diffusers'
default and by diffusers' best. The goals (issue 32): ours best <= 0.5x diffusers default and <= 1/1.3 = 0.77x
diffusers best, at equal quality, memory <= 1.0x.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import measure, reexec_with_mmap_threshold, write_report  # noqa: E402
from pipelines.text_to_image import default_dtype  # noqa: E402

PROMPT = "a red circle above a blue square"
GUIDANCE = 7.5
DIFFUSERS_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
                        "unipc": "UniPCMultistepScheduler", "pndm": "PNDMScheduler", "ddim": "DDIMScheduler",
                        "euler_ancestral": "EulerAncestralDiscreteScheduler"}  # fmt: skip


@dataclass
class Row:
    """One configuration: who runs it, in which dtype, with which sampler (ours) / scheduler (diffusers), how many
    steps, and a feature-cache interval (ours: cache_interval; diffusers: the DeepCache package); None: no cache."""

    label: str
    who: str  # "ours" or "diffusers"
    dtype: str
    sampler: str  # ours: a SAMPLERS name; diffusers: a DIFFUSERS_SCHEDULERS key or "folder" (the folder's own)
    steps: int
    cache: int | None = None
    cache_depth: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # further pipeline options of ours (e.g. sigma_schedule)


def default_rows(args: argparse.Namespace, fast: str, folder_default: str, ours: Any) -> list[Row]:
    """diffusers default, diffusers best, ours default (the pipeline's sampling_defaults), ours best (from the
    command line)."""
    ours_sampler, ours_steps = ours.sampling_defaults["sampler"], ours.sampling_defaults["num_inference_steps"]
    return [
        Row("diffusers default", "diffusers", "float32", folder_default, 50),
        Row("diffusers best", "diffusers", fast, args.diffusers_best_sampler, args.diffusers_best_steps,
            args.diffusers_best_cache, args.cache_depth),
        Row("ours default", "ours", args.ours_default_dtype or str(default_dtype(torch.device(args.device))).split(".")[-1],
            ours_sampler, ours_steps),
        Row("ours best", "ours", fast, args.best_sampler, args.best_steps, args.best_cache, args.cache_depth,
            {"sigma_schedule": args.best_schedule} if args.best_schedule else {}),
    ]


# ------------------------------------------------------------------------------------------------------ building


def load_bundled(device: torch.device) -> tuple[Any, Any]:
    """Our Pipeline and diffusers' StableDiffusionPipeline from the bundled model folder, fp32."""
    from diffusers import StableDiffusionPipeline

    from ldm.loading.sources import DEFAULT_MODEL
    from pipelines.text_to_image import Pipeline

    ours = Pipeline.from_pretrained(DEFAULT_MODEL, device=device, dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None,
                                                     requires_safety_checker=False).to(device)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def load_sd15(device: torch.device) -> tuple[Any, Any]:
    """SD 1.5-shaped random weights shared by both (benchmarks/pipeline.py), fp32, diffusers with PNDM (SD 1.5's)."""
    import diffusers

    from benchmarks.pipeline import build_pair

    ours, theirs = build_pair("sd15", "euler", device, torch.float32)
    theirs.scheduler = diffusers.PNDMScheduler.from_config({**dict(theirs.scheduler.config), "skip_prk_steps": True})
    return ours, theirs


class Runner:
    """Builds each row's pipeline once (a copy per dtype, so that no weights round-trip through a lower precision)
    and calls it."""

    def __init__(self, ours: Any, theirs: Any, device: torch.device, size: int | None, compile_best: bool) -> None:
        self.base = {"ours": ours, "diffusers": theirs}
        self.device, self.size, self.compile_best = device, size, compile_best
        self.copies: dict[tuple[str, str], Any] = {("ours", "float32"): ours, ("diffusers", "float32"): theirs}
        self.folder_scheduler = theirs.scheduler
        self.compile_seconds: dict[str, float] = {}

    def pipe(self, row: Row) -> Any:
        key = (row.who, row.dtype)
        if key not in self.copies:
            p = copy.deepcopy(self.base[row.who])
            dtype = getattr(torch, row.dtype)
            p.to(dtype=dtype) if row.who == "ours" else p.to(self.device, dtype)
            if self.compile_best:  # the fast-dtype copies are the best rows'
                p.compile() if row.who == "ours" else p.unet.compile()
            self.copies[key] = p
        return self.copies[key]

    def configure(self, row: Row) -> Any:
        """The row's pipeline with its scheduler and cache set (diffusers: DeepCache enabled or disabled)."""
        p = self.pipe(row)
        if row.who == "diffusers":
            import diffusers

            if row.sampler == "folder":
                p.scheduler = self.folder_scheduler
            else:
                cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[row.sampler])
                p.scheduler = cls.from_config(self.folder_scheduler.config)
            helper = getattr(p, "_deepcache", None)
            if helper is not None:
                helper.disable()
            if row.cache:
                from DeepCache import DeepCacheSDHelper

                p._deepcache = helper = helper or DeepCacheSDHelper(pipe=p)
                helper.set_params(cache_interval=row.cache, cache_branch_id=row.cache_depth or 0)
                helper.enable()
        return p

    def call(self, row: Row, prompt: str | list[str], seeds: list[int], output_type: str = "np",
             latents: torch.Tensor | None = None) -> Any:
        p = self.configure(row)
        kw: dict[str, Any] = {"num_inference_steps": row.steps, "guidance_scale": GUIDANCE, "output_type": output_type}
        if self.size is not None:
            kw.update(height=self.size, width=self.size)
        if row.who == "ours":
            if row.cache:
                kw.update(cache_interval=row.cache, **({} if row.cache_depth is None else
                                                       {"cache_depth": row.cache_depth}))
            out = p(prompt, sampler=row.sampler, seed=seeds, latents=latents, progress=False, **row.options, **kw)
            return out.latents if output_type == "latent" else out.images
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        if latents is not None:
            latents = latents.to(self.device, p.unet.dtype)
        out = p(prompt, generator=gens if len(gens) > 1 else gens[0], latents=latents, **kw)
        return out.images


# ------------------------------------------------------------------------------------------------------- quality


def adherence(runner: Runner, row: Row, sets: dict[str, list[str]], batch: int = 32) -> dict[str, float]:
    """All-correct rates (detector) of the single- and two-object seen sets, prompt i with seed i."""
    from ldm.shapes.detect import score_image
    from benchmarks.quality_metrics import summarize

    res = {}
    for name, prompts in sets.items():
        images = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            out = runner.call(row, chunk, list(range(i, i + len(chunk))))
            images.append(np.asarray(out, dtype=np.float64))
        imgs = np.concatenate(images)
        res[name] = summarize([score_image(p, im) for p, im in zip(prompts, imgs)])["all"]
    return res


def latent_rmse(runner: Runner, row: Row, reference: torch.Tensor, noise: torch.Tensor) -> float:
    out = runner.call(row, PROMPT, [0], output_type="latent", latents=noise)
    out = out if isinstance(out, torch.Tensor) else torch.as_tensor(out)
    return float((out.float().cpu() - reference).pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------------- runs


def bench(name: str, runner: Runner, rows: list[Row], args: argparse.Namespace) -> dict:
    print(f"[{name}] warm-up", flush=True)
    results: dict[str, dict] = {r.label: {"row": asdict(r), "times": [], "peaks": []} for r in rows}
    for row in rows:  # library start-up, kernels, DeepCache wrapping; the compile time with --compile
        t0 = time.perf_counter()
        runner.call(row, PROMPT, [0])
        results[row.label]["first_call_s"] = time.perf_counter() - t0
    for rep in range(args.reps):
        order = rows[rep % len(rows):] + rows[:rep % len(rows)]
        for row in order:
            _, sec, _, mib = measure(lambda row=row: torch.as_tensor(np.asarray(runner.call(row, PROMPT, [rep]))),
                                     runner.device)
            results[row.label]["times"].append(sec)
            results[row.label]["peaks"].append(mib)
            print(f"  [{name}] rep {rep + 1}/{args.reps} {row.label:18s} {sec:8.3f} s  peak +{mib:8.1f} MiB", flush=True)
    if name == "bundled":
        from benchmarks.quality import pair_prompts, single_prompts

        sets = {"single": single_prompts(args.n_single, False), "two objects": pair_prompts(args.n_pair, False)}
        for row in rows:
            print(f"  [{name}] adherence of {row.label}", flush=True)
            results[row.label]["quality"] = adherence(runner, row, sets)
    else:
        f = runner.base["ours"].vae_scale_factor
        noise = torch.randn(1, 4, args.size // f, args.size // f, generator=torch.Generator().manual_seed(1))
        ref_row = Row("reference", "ours", "float32", "dpmpp_2m", 100)
        reference = runner.call(ref_row, PROMPT, [0], output_type="latent", latents=noise).float().cpu()
        for row in rows:
            results[row.label]["quality"] = {"latent_rmse": latent_rmse(runner, row, reference, noise)}
    for r in results.values():
        r["seconds_per_image"] = statistics.median(r["times"])
        r["peak_mem_mib"] = statistics.median(r["peaks"])
    base = results[rows[0].label]
    best_d = results[rows[1].label]
    for r in results.values():
        r["vs_diffusers_default"] = r["seconds_per_image"] / base["seconds_per_image"]
        r["vs_diffusers_best"] = r["seconds_per_image"] / best_d["seconds_per_image"]
        r["mem_vs_diffusers_default"] = r["peak_mem_mib"] / max(base["peak_mem_mib"], 1e-9)
    return results


def describe(row: dict) -> str:
    cache = f", cache every {row['cache']}" + (f" (depth {row['cache_depth']})" if row["cache_depth"] is not None
                                               else "") if row["cache"] else ""
    extra = "".join(f", {k}={v}" for k, v in row["options"].items())
    return f"{row['dtype']}, {row['sampler']}, {row['steps']} steps{cache}{extra}"


def report_md(res: dict) -> str:
    lines = ["# Speed at equal quality: ours and diffusers, default and best configurations", "",
             f"device `{res['device']}`, torch {res['torch']}, diffusers {res['diffusers']}, {res['threads']} threads, "
             f"{res['reps']} repetitions (median), guidance {GUIDANCE}, {res['platform']}.", ""]
    for name, results in res["models"].items():
        bundled = name == "bundled"
        q = "single / two-object all-correct" if bundled else "latent RMSE to the 100-step reference"
        lines += [f"## {name}" + (" (64 x 64 px, detector adherence)" if bundled else f" ({res['size']} px, random "
                                  "weights)"), "",
                  f"| configuration | settings | s / image | vs diffusers default | vs diffusers best | peak MiB "
                  f"| mem vs default | {q} | first call s |", "|---|---|---|---|---|---|---|---|---|"]
        for label, r in results.items():
            qual = r["quality"]
            qs = (f"{qual['single']:.0%} / {qual['two objects']:.0%}" if bundled else f"{qual['latent_rmse']:.4f}")
            lines.append(f"| {label} | {describe(r['row'])} | {r['seconds_per_image']:.3f} | "
                         f"{r['vs_diffusers_default']:.2f}x | {r['vs_diffusers_best']:.2f}x | {r['peak_mem_mib']:.0f} | "
                         f"{r['mem_vs_diffusers_default']:.2f}x | {qs} | {r['first_call_s']:.2f} |")
        lines.append("")
    if res.get("n_single"):
        lines += [f"Adherence: {res['n_single']} single-object and {res['n_pair']} two-object seen prompts "
                  "(benchmarks/quality.py's sets), one image each, the same seeds in every row.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast-dtype", default=None, help="the best rows' dtype (default bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--ours-default-dtype", default=None,
                   help="the 'ours default' row's dtype (default: the Pipeline's, pipelines.text_to_image.default_dtype: "
                   "float16 on CUDA, bfloat16 on CPUs with native bf16, else float32)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--skip-bundled", action="store_true")
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--size", type=int, default=None, help="SD 1.5 image size (default 128 on CPU, 512 on CUDA)")
    p.add_argument("--n-single", type=int, default=96)
    p.add_argument("--n-pair", type=int, default=96)
    p.add_argument("--best-sampler", default="dpmpp_2m")
    p.add_argument("--best-steps", type=int, default=10)
    p.add_argument("--best-cache", type=int, default=None)
    p.add_argument("--best-schedule", default=None, help="our best row's sigma_schedule")
    p.add_argument("--cache-depth", type=int, default=None, help="cache depth (ours) / cache_branch_id (DeepCache)")
    p.add_argument("--diffusers-best-sampler", default="dpmpp_2m", choices=sorted(DIFFUSERS_SCHEDULERS))
    p.add_argument("--diffusers-best-steps", type=int, default=10)
    p.add_argument("--diffusers-best-cache", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the best rows' U-Nets (time reported)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    device = torch.device(args.device)
    fast = args.fast_dtype or ("float16" if device.type == "cuda" else "bfloat16")
    args.size = args.size or (512 if device.type == "cuda" else 128)
    import diffusers

    res: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
                           "threads": torch.get_num_threads(), "platform": platform.platform(), "reps": args.reps,
                           "size": args.size, "n_single": 0 if args.skip_bundled else args.n_single,
                           "n_pair": args.n_pair, "models": {}}  # fmt: skip
    if not args.skip_bundled:
        ours, theirs = load_bundled(device)
        rows = default_rows(args, fast, "folder", ours)
        res["models"]["bundled"] = bench("bundled", Runner(ours, theirs, device, None, args.compile), rows, args)
        del ours, theirs
    if not args.skip_sd:
        ours, theirs = load_sd15(device)
        rows = default_rows(args, fast, "folder", ours)
        res["models"]["sd15"] = bench("sd15", Runner(ours, theirs, device, args.size, args.compile), rows, args)
    write_report(args.out, f"speed-{device.type}", res, report_md(res))


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
