"""The bundled 64 -> 256 cascade (issue 27): does the super-resolution stage keep the base model's prompt adherence,
does it draw sharper images than bicubic upscaling, and does blur augmentation in its training help (the claim of
Ho et al. 2021, "Cascaded Diffusion Models": conditioning augmentation, blur above all, against the mismatch between
a stage's training inputs and the previous stage's imperfect images)?

On the shapes prompts of benchmarks/quality.py (a subset of its prompt sets), the base model's 64 px images are
upscaled by the stage (`--stage`, the bundled one by default) and, with `--ablation`, by the same stage trained
without blur; each stage also upscales TRUE 64 px renders (the test split's 256 px renders downsampled as in
training: antialiased bicubic), for which the 256 px truth is known.

- adherence: the analytic detector (ldm.shapes.detect, GenEval-style) on the 256 px images downsampled to 64 px,
  against the base model's own 64 px images (the issue asks for the cascade within 3 points);
- sharpness: the share of spectral energy above the 64 px grid's Nyquist frequency (1/8 cycle per pixel at 256 px:
  detail a 64 px image cannot hold) and the RMS gradient magnitude, against those of the true 256 px renders
  (closer is better; bicubic upscaling of the same 64 px images is the baseline);
- on true renders: PSNR and RMSE of the 256 px output against the truth;
- a sweep of the stage's sampling settings (noise level, guidance, steps), which chose its defaults.

Writes benchmarks/results/cascade.md and .json, and with --docs the "Cascade (64 -> 256)" section of
docs/quality.md (replacing the section if present, else appending it).

    ldm export runs/sr-shapes-256-noblur ./sr-noblur                     # the ablation's stage (blur_prob=0)
    python benchmarks/cascade.py --blur-equal ./sr-4000 --ablation ./sr-noblur --docs   # full run (10 min, one thread)
    python benchmarks/cascade.py --quick --stage ./sr-blur --ablation ./sr-noblur   # a smoke run (about 7 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality import _pct, _shown, generate, prompt_sets, test_images  # noqa: E402
from benchmarks.quality_metrics import summarize  # noqa: E402
from ldm.random import cpu_generator  # noqa: E402
from ldm.shapes.detect import score_image  # noqa: E402
from ldm.training.super_resolution import downsample  # noqa: E402
from ldm.training.vae import psnr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Cascade (64 -> 256)"
UPSCALE_SEED = 1_000_000  # image i of a stage draws from seed UPSCALE_SEED + i: the same noise for both stages

# --------------------------------------------------------------------------------------------------- measures


def _tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) numpy in [0, 1] -> (N, 3, H, W) float64 tensor; a (N, 3, H, W) tensor passes."""
    if isinstance(images, torch.Tensor):
        return images.double()
    return torch.from_numpy(np.array(images, dtype=np.float64)).permute(0, 3, 1, 2)


def high_frequency_share(images: np.ndarray | torch.Tensor, cutoff: float) -> np.ndarray:
    """Per image (N,), the share of its spectral energy (Parseval: sum |FFT|^2 over the channels, mean removed) at
    radial frequencies above `cutoff` cycles per pixel (Nyquist: 0.5); 0 for a constant image."""
    x = _tensor(images)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(1)  # (N, H, W)
    fy, fx = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64), torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()  # (H, W) cycles per pixel
    total = power.flatten(1).sum(1)
    high = (power * (radius > cutoff)).flatten(1).sum(1)
    return torch.where(total > 0, high / total.clamp_min(1e-300), 0.0).numpy()


def rms_gradient(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per image (N,), the root mean square over pixels and channels of |grad| (forward differences), in intensity
    (0..1) per pixel of the image's own grid. Unlike the mean |grad| (a blurred monotone edge keeps its total
    variation), it falls as edges blur: a step of height h spread over w pixels gives sqrt(h^2 / w) per row."""
    x = _tensor(images)
    dx, dy = x[..., :-1, 1:] - x[..., :-1, :-1], x[..., 1:, :-1] - x[..., :-1, :-1]
    return (dx ** 2 + dy ** 2).flatten(1).mean(1).sqrt().numpy()


def psnr_rmse(images: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per image (N,): PSNR in dB for pixels in [0, 1] (peak 1; ldm.training.vae.psnr on [-1, 1]) and RMSE."""
    a, b = _tensor(images), _tensor(truth)
    rmse = (a - b).pow(2).flatten(1).mean(1).sqrt()
    return psnr(a * 2 - 1, b * 2 - 1).double().numpy(), rmse.numpy()


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) in [0, 1] to size x size: down antialiased bicubic (the stage's training downsampling,
    ldm.training.super_resolution.downsample), up plain bicubic (the baseline), clamped to [0, 1]."""
    x = _tensor(images).float()
    if size < x.shape[-1]:
        y = (downsample(x * 2 - 1, (size, size)) + 1) / 2
    else:
        y = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return y.permute(0, 2, 3, 1).double().numpy()


def measures(prompts: list[str], images: np.ndarray, *, low: int = 64) -> dict[str, Any]:
    """Adherence of `images` (scored at `low` px) and their sharpness: the high-frequency share above the `low` px
    grid's Nyquist frequency, the RMS gradient magnitude."""
    small = images if images.shape[1] == low else resize(images, low)
    scores = [score_image(p, im) for p, im in zip(prompts, small)]
    row: dict[str, Any] = summarize(scores)
    row["all_each"] = [bool(s["all"]) for s in scores]  # per image, for paired differences
    if images.shape[1] > low:
        row["hf_share"] = float(high_frequency_share(images, 0.5 * low / images.shape[1]).mean())
        row["gradient"] = float(rms_gradient(images).mean())
    return row


# --------------------------------------------------------------------------------------------------------- runs


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """The mean of b - a over paired 0/1 outcomes and 1.96 standard errors of it (normal approximation)."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return float(d.mean()), float(1.96 * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def upscale(up: Any, prompts: list[str], images: np.ndarray, settings: dict[str, Any], every: int = 1,
            batch: int = 16) -> np.ndarray:
    """The stage's (N, 4H, 4W, 3) images of the (N, H, W, 3) ones, prompt i from seed UPSCALE_SEED + every * i
    (`every`: the step of the subset these prompts are of the benchmark's list, so image and seed stay paired)."""
    out = []
    for i in range(0, len(prompts), batch):
        low = _tensor(images[i:i + batch]).float()
        gens = [cpu_generator(UPSCALE_SEED + every * j) for j in range(i, i + len(low))]
        res = up(prompts[i:i + batch], image=low, generator=gens, output_type="np", progress=False, **settings)
        out.append(np.asarray(res.images, dtype=np.float64))
    return np.concatenate(out)


def sweep_settings(quick: bool, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's settings tried: the defaults, then one change at a time (strength, noise level, guidance, steps)."""
    base = {k: defaults[k] for k in ("noise_level", "guidance_scale", "num_inference_steps", "sampler", "strength")}
    changes = [{"strength": 1.0}, {"noise_level": 0}, {"noise_level": 100}] if quick else [
        {"strength": 1.0}, {"strength": 0.6}, {"strength": 0.4}, {"strength": 0.25}, {"strength": 0.15},
        {"noise_level": 0}, {"noise_level": 50}, {"noise_level": 100}, {"noise_level": 200},
        {"guidance_scale": 3.0}, {"num_inference_steps": 10}, {"num_inference_steps": 40}]
    return [base] + [{**base, **c} for c in changes if any(base[k] != v for k, v in c.items())]


def _setting(s: dict[str, Any]) -> str:
    return (f"{s['sampler']} {s['num_inference_steps']}, strength {s['strength']:g}, noise {s['noise_level']}, "
            f"guidance {s['guidance_scale']:g}")


def _row(name: str, r: dict[str, Any]) -> str:
    cells = [name, _pct(r["all"]), _pct(r["shape"]), _pct(r["color"])]
    cells += [f"{r['hf_share']:.4f}", f"{r['gradient']:.4f}"] if "hf_share" in r else ["–", "–"]
    cells += [f"{r['psnr']:.2f}", f"{r['rmse']:.4f}"] if "psnr" in r else ["–", "–"]
    return "| " + " | ".join(cells) + " |"


HEADER = ["| images | all-correct | shape | colour | HF share | RMS gradient | PSNR (dB) | RMSE |",
          "|---|---|---|---|---|---|---|---|"]


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section that starts at the line `heading` (up to the next '## ' heading) replaced by `body`,
    or `body` appended after a blank line when there is none."""
    lines = text.rstrip("\n").split("\n")
    if heading not in lines:
        return "\n".join(lines) + "\n\n" + body.rstrip("\n") + "\n"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rest = lines[end:]
    return "\n".join(lines[:start] + body.rstrip("\n").split("\n") + ([""] + rest if rest else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ldm.io import write_text
    from ldm.loading.sources import DEFAULT_UPSCALER, upscaler_sampling_defaults
    from pipelines.call_options import check_float
    from pipelines.text_to_image import Pipeline
    from pipelines.upscaler import Upscaler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default=str(DEFAULT_UPSCALER), help="the stage (trained with blur augmentation)")
    parser.add_argument("--ablation", default=None, help="the same stage trained without blur (blur_prob=0)")
    parser.add_argument("--blur-equal", default=None, help="the blur stage at the ablation's step count, when "
                        "--stage trained longer (default: none; --stage is then the ablation's equal)")
    parser.add_argument("--base", default="default", help="the base text-to-image model (default: bundled)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer prompts, renders and settings")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep of the stage's settings")
    parser.add_argument("--docs", action="store_true", help="also write the section of docs/quality.md")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cascade.md"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cascade.json"))
    parser.add_argument("--strength", type=float, default=None, help="the stages' strength in the main tables "
                        "(default: the bundled stage's; 1: from the prior, as CDM and diffusers' upscaler)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, q = time.perf_counter(), args.quick
    opts = {"device": "cpu", "dtype": torch.float32}
    pipe = Pipeline(**opts) if args.base == "default" else Pipeline.from_pretrained(args.base, **opts)
    stages = {"stage": Upscaler.from_pretrained(args.stage, **opts)}
    if args.blur_equal is not None:
        stages["blur stage, equal steps"] = Upscaler.from_pretrained(args.blur_equal, **opts)
    if args.ablation is not None:
        stages["no-blur stage"] = Upscaler.from_pretrained(args.ablation, **opts)
    defaults = upscaler_sampling_defaults("default")  # the bundled stage's settings, for every stage
    if args.strength is not None:
        defaults["strength"] = check_float("strength", args.strength, 0.0, 1.0, low_open=True)
    sets = {k: v[:n] for (k, v), n in zip(prompt_sets(8, 8).items() if q else prompt_sets(16, 16).items(),
                                          (6, 3, 6, 3) if q else (16, 8, 16, 8))}
    prompts = [p for v in sets.values() for p in v]
    base_gen = {"guidance": 7.5, "sampler": pipe.sampling_defaults["sampler"],
                "steps": pipe.sampling_defaults["num_inference_steps"]}
    base64 = generate(pipe, prompts, **base_gen)  # (N, 64, 64, 3): prompt i from seed i
    n_true = 12 if q else 48
    true256, captions = test_images(n_true, "test", 0, size=256)
    true64 = resize(true256, 64)

    def on_base(images: np.ndarray) -> dict[str, Any]:
        return {"all sets": measures(prompts, images), **{name: measures(ps, images[i:i + len(ps)]) for name, ps, i
                                                          in _spans(sets)}}

    def on_true(images: np.ndarray) -> dict[str, Any]:
        p, r = psnr_rmse(images, true256)
        return {**measures(captions, images), "psnr": float(p.mean()), "rmse": float(r.mean())}

    results: dict[str, Any] = {"base": {"base 64 px": on_base(base64), "bicubic x4": on_base(resize(base64, 256))},
                               "true": {"true 256 px renders": measures(captions, true256),
                                        "true 64 px renders": measures(captions, true64),
                                        "bicubic x4": on_true(resize(true64, 256))}}
    timing, made = {}, {}
    for name, up in stages.items():
        t = time.perf_counter()
        made[name] = upscale(up, prompts, base64, defaults), None
        timing[name] = (time.perf_counter() - t) / len(prompts)
        made[name] = made[name][0], upscale(up, captions, true64, defaults)
        results["base"][name], results["true"][name] = on_base(made[name][0]), on_true(made[name][1])
    sweep = []
    every, n_sweep = (3, 6) if q else (2, 16)  # a subset: every k-th prompt (all sets), the first renders
    sweep_prompts, sweep_base = prompts[::every], base64[::every]
    sweep_truth, sweep_captions = true256[:n_sweep], captions[:n_sweep]
    for s in [] if args.no_sweep else sweep_settings(q, defaults):
        if s == defaults:  # made above, from the same seeds
            on_b, out = made["stage"][0][::every], made["stage"][1][:n_sweep]
        else:
            on_b = upscale(stages["stage"], sweep_prompts, sweep_base, s, every)
            out = upscale(stages["stage"], sweep_captions, true64[:n_sweep], s)
        p, _ = psnr_rmse(out, sweep_truth)
        sweep.append({"settings": s, "base": measures(sweep_prompts, on_b),
                      "true": {**measures(sweep_captions, out), "psnr": float(p.mean())}})

    lines = _report(args, q, sets, base_gen, defaults, results, sweep, timing, n_true, time.perf_counter() - t0)
    write_text("\n".join(lines) + "\n", args.out)
    data = {"stage": _shown(args.stage), "ablation": args.ablation and _shown(args.ablation),
            "blur_equal": args.blur_equal and _shown(args.blur_equal), "quick": q,
            "base_sampling": base_gen, "stage_settings": defaults, "prompts": {k: len(v) for k, v in sets.items()},
            "true_renders": n_true, "results": results, "sweep": sweep, "s_per_image": timing,
            "wall_s": time.perf_counter() - t0}
    write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", args.json)
    if args.docs:
        doc = ROOT / "docs" / "quality.md"
        body = [SECTION, "", f"From `benchmarks/cascade.py` ({'quick' if q else 'full'} run; "
                "benchmarks/results/cascade.md has the per-set tables).", "", *lines[2:]]
        write_text(replace_section(doc.read_text(), SECTION, "\n".join(body)), doc)
    print("\n".join(lines))
    return 0


def _spans(sets: dict[str, list[str]]) -> list[tuple[str, list[str], int]]:
    """(name, prompts, offset in the concatenated list) per prompt set."""
    out, i = [], 0
    for name, ps in sets.items():
        out.append((name, ps, i))
        i += len(ps)
    return out


def _report(args: argparse.Namespace, q: bool, sets: dict[str, list[str]], base_gen: dict[str, Any],
            defaults: dict[str, Any], results: dict[str, Any], sweep: list[dict[str, Any]],
            timing: dict[str, float], n_true: int, wall: float) -> list[str]:
    """The markdown report (its first two lines: the title and a blank line)."""
    base = results["base"]
    lines = [f"# The 64 -> 256 cascade ({'quick' if q else 'full'} run of benchmarks/cascade.py)", "",
             f"Stage: `{_shown(args.stage)}`" + (f"; with blur at the ablation's step count: "
                                                 f"`{_shown(args.blur_equal)}`" if args.blur_equal else "")
             + (f"; without blur (ablation): `{_shown(args.ablation)}`" if args.ablation else "")
             + f". Base model: `{args.base}` "
             f"({base_gen['sampler']} {base_gen['steps']} steps, guidance {base_gen['guidance']:g}), prompt i "
             f"from seed i. Stage settings: {_setting(defaults)}; image i from seed {UPSCALE_SEED} + i (the same "
             "noise for every stage). Prompts (quality.py's sets): " + ", ".join(f"{k} {len(v)}" for k, v in
                                                                                 sets.items()) + f"; true renders: "
             f"{n_true} of the test split. Adherence is scored at 64 px (256 px images downsampled, antialiased "
             "bicubic). HF share: spectral energy above 1/8 cycle per pixel (the 64 px grid's Nyquist) over all "
             "but the mean; RMS gradient: |grad| per pixel at 256 px; for both, the true 256 px renders' values "
             "are the target.", "",
             "### Fed the base model's 64 px images (all prompt sets)", "", *HEADER]
    lines += [_row(name, r["all sets"]) for name, r in base.items()]
    ref = base["base 64 px"]["all sets"]["all_each"]
    deltas = {name: paired_difference(ref, r["all sets"]["all_each"]) for name, r in base.items()
              if name != "base 64 px"}
    lines += ["", "All-correct minus the base model's, paired over the same prompts (± 1.96 standard errors): "
              + "; ".join(f"{name} {100 * d:+.1f} ± {100 * e:.1f} points" for name, (d, e) in deltas.items()) + "."]
    target = results["true"]["true 256 px renders"]
    lines += ["", f"Target sharpness (true 256 px renders): HF share {target['hf_share']:.4f}, "
              f"RMS gradient {target['gradient']:.4f}.", "",
              "### Fed true 64 px renders (truth known)", "", *HEADER]
    lines += [_row(name, r) for name, r in results["true"].items()]
    lines += ["", "### All-correct per prompt set (fed the base model's images)", "",
              "| images | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(_pct(r[k]["all"]) for k in sets) + " |" for name, r in base.items()]
    if sweep:
        lines += ["", "### The stage's settings (one change at a time from the defaults)", "",
                  f"On a subset: {len(sweep[0]['base']['all_each'])} of the prompts (every k-th, all sets) and the "
                  f"first {len(sweep[0]['true']['all_each'])} true renders.", "",
                  "| settings | all-correct (base images) | HF share (base) | all-correct (true) | HF share (true) | "
                  "PSNR (true) |", "|---|---|---|---|---|---|"]
        lines += [f"| {_setting(r['settings'])} | {_pct(r['base']['all'])} | {r['base']['hf_share']:.4f} | "
                  f"{_pct(r['true']['all'])} | {r['true']['hf_share']:.4f} | {r['true']['psnr']:.2f} |" for r in sweep]
    lines += ["", "Seconds per upscaled image (one thread): " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items())
              + f". Total wall time: {wall:.0f} s."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
