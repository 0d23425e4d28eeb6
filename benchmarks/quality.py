"""Prompt adherence and image quality of a shapes text-to-image model (the bundled default model by default).

GenEval-style adherence (Ghosh et al. 2023): images generated for structured prompts are scored attribute by
attribute by the analytic detector ldm.shapes.detect (100% on clean renders): single-object prompts ("a red circle",
sometimes with a position) and two-object prompts with a relation ("a red circle above a blue square"), each for
seen (colour, shape) pairs and for the held-out pairs the training split never shows. Also: CLIP score with the
model's small CLIP (Hessel et al. 2021), a Frechet distance in its image-feature space to the test images (the FID
recipe of Heusel et al. 2017 with the small CLIP's image tower as the feature map), the VAE's reconstruction PSNR,
a guidance-scale sweep and a sampler x steps sweep (the measures are in benchmarks/quality_metrics.py). Writes
docs/quality.md, docs/quality-grid.png and benchmarks/results/quality.json.

    python benchmarks/quality.py            # full run (about 15 minutes on 2 CPU cores)
    python benchmarks/quality.py --quick    # a smoke run (a minute): fewer prompts, scales and samplers
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.shapes import scenes as S  # noqa: E402
from ldm.io import write_bytes  # noqa: E402
from ldm.shapes.captions import prompt_caption  # noqa: E402
from ldm.shapes.dataset import dataset_item  # noqa: E402
from ldm.shapes.detect import score_image  # noqa: E402
from benchmarks.quality_metrics import (  # noqa: E402
    ATTRIBUTES, caption_sensitivity, clip_features, clip_score, fd, summarize, text_separation, vae_reconstruction,
)
from benchmarks.relations import markdown as relation_markdown, relation_breakdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- prompts


def _pairs(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in S.COLORS for s in S.SHAPES if ((c, s) in S.HELD_OUT_PAIRS) == held_out]


def single_prompts(n: int, held_out: bool, seed: int = 0) -> list[str]:
    """n single-object prompts over seen (or held-out) pairs; every other one states a position."""
    rng = np.random.default_rng([seed, 1, held_out])
    pairs = _pairs(held_out)
    out = []
    for i in range(n):
        c, s = pairs[i % len(pairs)] if i < len(pairs) else pairs[rng.integers(len(pairs))]
        where = S.POSITIONS[rng.integers(len(S.POSITIONS))] if i % 2 else None
        out.append(prompt_caption(S.Prompt((S.PromptObject(s, c, position=where),))))
    return out


def pair_prompts(n: int, held_out: bool, seed: int = 0) -> list[str]:
    """n two-object prompts "A <relation> B" with distinct pairs; held_out: one of the two pairs is held out."""
    rng = np.random.default_rng([seed, 2, held_out])
    seen, held = _pairs(False), _pairs(True)
    out = []
    while len(out) < n:
        a = (held if held_out else seen)[rng.integers(len(held if held_out else seen))]
        b = seen[rng.integers(len(seen))]
        if a[1] == b[1] or a[0] == b[0]:  # distinct colours and shapes: each attribute tells the two apart
            continue
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        rel = S.RELATIONS[rng.integers(len(S.RELATIONS))]
        objects = (S.PromptObject(first[1], first[0]), S.PromptObject(second[1], second[0]))
        out.append(prompt_caption(S.Prompt(objects, (0, rel, 1))))
    return out


def prompt_sets(n_single: int, n_pair: int) -> dict[str, list[str]]:
    return {"single, seen": single_prompts(n_single, False), "single, held-out": single_prompts(n_single // 2, True),
            "two objects, seen": pair_prompts(n_pair, False), "two objects, held-out": pair_prompts(n_pair // 2, True)}


# ------------------------------------------------------------------------------------------------- generation


def generate(pipe: Any, prompts: list[str], *, guidance: float, sampler: str, steps: int, seed: int = 0,
             batch: int = 64, **options: Any) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] for the prompts; prompt i gets seed `seed + i` whatever the batching; `options`
    go to the pipeline (e.g. guidance_interval)."""
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        res = pipe(chunk, guidance_scale=guidance, sampler=sampler, num_inference_steps=steps,
                   seed=list(range(seed + i, seed + i + len(chunk))), output_type="np", progress=False, **options)
        out.append(np.asarray(res.images, dtype=np.float64))
    return np.concatenate(out)


def test_images(n: int, split: str, seed: int, size: int = 64) -> tuple[np.ndarray, list[str]]:
    """The recipe's test images (pure functions of seed, split, index): held-out = ("test", 0), seen = ("train", 1)."""
    items = [dataset_item(seed, split, i, size) for i in range(n)]
    return np.stack([np.asarray(im, dtype=np.float64) / 255 for im, _, _ in items]), [c for _, c, _ in items]


# ------------------------------------------------------------------------------------------------------- runs


def adherence(pipe: Any, clip: Any | None, sets: dict[str, list[str]], **gen: Any) -> dict[str, dict[str, float]]:
    """summarize(score_image) and, with a CLIP (None: detector only), the mean CLIP score of each prompt set."""
    out = {}
    for name, prompts in sets.items():
        images = generate(pipe, prompts, **gen)
        row = summarize([score_image(p, im) for p, im in zip(prompts, images)])
        if clip is not None:
            scores = clip_score(clip_features(clip, images), clip_features(clip, texts=prompts))
            row["clip_score"] = float(scores.mean())
        out[name] = row
    return out


def save_grid(pipe: Any, prompts: list[str], seeds: int, path: Path, **gen: Any) -> None:
    """prompts x seeds images as one PNG (rows: prompts)."""
    rows = [generate(pipe, [p] * seeds, **gen) for p in prompts]  # each (seeds, H, W, 3)
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    png = io.BytesIO()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(png, format="PNG")
    write_bytes(png.getvalue(), path)  # atomic; creates the folder


def _shown(folder: str) -> str:
    """A model folder as the report names it: relative to the repository when inside it."""
    path = Path(folder).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.0f}%"


def main(argv: list[str] | None = None) -> int:
    from ldm.training.clip import load_clip
    from ldm.io import write_text
    from ldm.loading.sources import DEFAULT_MODEL
    from pipelines.text_to_image import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="pipeline folder with a clip/ subfolder")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "docs" / "quality.md"))
    parser.add_argument("--grid", default=str(ROOT / "docs" / "quality-grid.png"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampler", default="dpmpp_2m", help="sampler of every section but the sampler table")
    parser.add_argument("--steps", type=int, default=20, help="its step count")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    clip = load_clip(Path(args.model) / "clip", text_encoder_folder=args.model)
    q = args.quick
    sets = prompt_sets(8 if q else 48, 8 if q else 40)
    scales = [1.0, 3.0] if q else [1.0, 2.0, 3.0, 5.0, 7.5]
    base = {"sampler": args.sampler, "steps": args.steps}
    lines = [f"# Default model quality ({'quick' if q else 'full'} run of benchmarks/quality.py)", "",
             f"Model: `{_shown(args.model)}`. Detector: ldm.shapes.detect (GenEval-style; 100% on clean renders). "
             f"One image per prompt, prompt i with seed i. Sampler {base['sampler']}, {base['steps']} steps unless "
             "stated. Prompt counts: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()) + ".", ""]

    # 1. guidance sweep: adherence, CLIP score and the Frechet distance to the test-seen images at each s
    n_fd = 64 if q else 300
    seen_x, seen_c = test_images(n_fd, "train", 1)
    held_x, held_c = test_images(n_fd, "test", 0)
    train_x, _ = test_images(n_fd, "train", 0)
    f_seen, f_train = (clip_features(clip, x) for x in (seen_x, train_x))
    sweep = {s: adherence(pipe, clip, sets, guidance=s, **base) for s in scales}
    fd_by_scale = {s: fd(clip_features(clip, generate(pipe, seen_c, guidance=s, **base)), f_seen) for s in scales}
    lines += ["## All-correct rate, CLIP score and Frechet distance vs guidance scale s", "",
              f"FD: {n_fd} images for the test-seen captions vs the {n_fd} test-seen images, in the small CLIP's "
              "image-feature space (section 3).", "",
              "| s | " + " | ".join(sets) + " | CLIP score (mean) | FD |", "|---" * (len(sets) + 3) + "|"]
    for s, res in sweep.items():
        cs = np.mean([r["clip_score"] for r in res.values()])
        lines.append(f"| {s:g} | " + " | ".join(_pct(res[k]["all"]) for k in sets) + f" | {cs:.1f} | "
                     f"{fd_by_scale[s]:.3f} |")
    best = max(scales, key=lambda s: sweep[s]["single, seen"]["all"] + sweep[s]["two objects, seen"]["all"])
    lines += ["", f"Best s (single + two-object seen all-correct): **{best:g}**.", "",
              f"## Per attribute at s = {best:g}", "", "| set | " + " | ".join(ATTRIBUTES) + " | CLIP score |",
              "|---" * (len(ATTRIBUTES) + 2) + "|"]
    for name, r in sweep[best].items():
        lines.append(f"| {name} | " + " | ".join(_pct(r[a]) for a in ATTRIBUTES) + f" | {r['clip_score']:.1f} |")

    # 2. sampler x steps at the best s (seen prompts)
    seen = {k: v[:24] for k, v in sets.items() if k.endswith("seen")}
    combos = [("dpmpp_2m", 20), ("euler", 20)] if q else list(itertools.product(
        ["dpmpp_2m", "euler", "ddim", "euler_ancestral"], [10, 20, 50]))
    lines += ["", f"## Sampler and steps at s = {best:g} (the first 24 prompts of each seen set)", "",
              "| sampler | steps | single all | two-object all | s / image |", "|---|---|---|---|---|"]
    by_sampler = []
    for sampler, steps in combos:
        t = time.perf_counter()
        r = adherence(pipe, clip, seen, guidance=best, sampler=sampler, steps=steps)
        per = (time.perf_counter() - t) / sum(len(v) for v in seen.values())
        by_sampler.append({"sampler": sampler, "steps": steps, "results": r, "s_per_image": per})
        lines.append(f"| {sampler} | {steps} | {_pct(r['single, seen']['all'])} | "
                     f"{_pct(r['two objects, seen']['all'])} | {per:.3f} |")

    # 2a. relations: per word, and how they fail (the seen two-object prompts, 3 seeds each)
    rel = relation_breakdown(lambda ps, seed: generate(pipe, ps, guidance=best, seed=seed, **base),
                             sets["two objects, seen"], 1 if q else 3)
    lines += ["", f"## Relations at s = {best:g}: per word, and how they fail (two-object seen prompts, "
              f"{1 if q else 3} seeds each)", "", "swapped: on the stated axis, the wrong way round; orthogonal: on "
              "the other axis; missing: an object's colour not found (ldm.shapes.detect.relation_outcome).", "",
              *relation_markdown(rel)]

    # 2b. guidance only in an interval of noise levels (Kynkäänniemi et al. 2024), at the best s
    lines += ["", f"## Guidance interval at s = {best:g} ({base['sampler']}, {base['steps']} steps, the same "
              "prompts)", "",
              "| guided where | single all | single shape | two-object all |", "|---|---|---|---|"]
    by_interval = {}
    for interval in [None, (0.3, 20.0), (1.0, 20.0), (0.0, 3.0)]:
        r = adherence(pipe, clip, seen, guidance=best, guidance_interval=interval, **base)
        by_interval[str(interval)] = r
        lines.append(f"| {'every step' if interval is None else f'{interval[0]:g} < sigma <= {interval[1]:g}'} | "
                     f"{_pct(r['single, seen']['all'])} | {_pct(r['single, seen']['shape'])} | "
                     f"{_pct(r['two objects, seen']['all'])} |")

    # 3. Frechet distance (CLIP image features) and VAE PSNR on the test images
    fd_real = fd(f_train, f_seen)
    lines += ["", "## Frechet distance in the small CLIP's image-feature space (64-d projected features)", "",
              f"N = {n_fd} per set; generated images use the test-seen captions at s = {best:g}.", "",
              "| sets | FD |", "|---|---|",
              f"| generated vs test-seen | {fd_by_scale[best]:.4f} |",
              f"| train vs test-seen (real vs real reference) | {fd_real:.4f} |",
              "", f"## VAE reconstructions (posterior mode) of {n_fd} test images", "",
              "PSNR in dB for pixels in [-1, 1]; all-correct = the detector on the reconstruction against the image's "
              "own caption (clean renders score 100%): how well the VAE draws test scenes (not a bound on generated "
              "images).", "",
              "| split | PSNR | all-correct |", "|---|---|---|"]
    vae_rows = {}
    for name, (x, c) in {"test-seen": (seen_x, seen_c), "test-held-out": (held_x, held_c)}.items():
        p, a = vae_reconstruction(pipe, x, c)
        vae_rows[name] = {"psnr": p, "all_correct": a}
        lines.append(f"| {name} | {p:.2f} | {_pct(a)} |")

    # 4. what the text conditioning tells apart
    sep = text_separation(pipe.text_encoder)
    lines += ["", "## Text conditioning: relative distance between captions that differ in one word", "",
              "|E(a) - E(b)| / |E(a)| over the (n, D) text-encoder outputs the U-Net attends to, averaged over all "
              "minimal pairs of each kind (text_separation).", "",
              "| " + " | ".join(sep) + " |", "|---" * len(sep) + "|", "| " + " | ".join(f"{v:.3f}" for v in sep.values())
              + " |"]

    # 5. which words the U-Net listens to
    sens = caption_sensitivity(pipe, seen_x[:256], seen_c[:256])
    kinds = list(next(iter(sens.values())))
    lines += ["", "## Caption sensitivity: how much the U-Net's x0 estimate worsens when one word is changed", "",
              "MSE of the x0 estimate with a caption changed in one attribute (ldm.shapes.negatives) over that with "
              "the true caption, minus 1, on the same noisy latents of 256 test-seen images (caption_sensitivity). "
              "0% = the word is ignored; layout (position, relation) can only matter at high noise.", "",
              "| timesteps | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {band} | " + " | ".join(f"{100 * r[k]:.1f}%" if r[k] == r[k] else "–" for k in kinds) + " |"
              for band, r in sens.items()]

    # 6. grid
    grid_prompts = ["a red circle", "a blue square on the left", "a yellow star at the top", "a green circle",
                    "a red circle above a blue square", "a white cross to the left of an orange triangle"]
    save_grid(pipe, grid_prompts, 6, Path(args.grid), guidance=best, **base)
    lines += ["", f"## Samples (s = {best:g}, seeds 0-5; rows: " + "; ".join(grid_prompts) + ")", "",
              f"![grid]({Path(args.grid).name})", "", f"Total wall time: {time.perf_counter() - t0:.0f} s.", ""]
    write_text("\n".join(lines), args.out)
    data = {"model": _shown(args.model), "quick": q, "base": base, "n_fd": n_fd, "best_scale": best,
            "guidance_sweep": {str(s): {"sets": sweep[s], "fd": fd_by_scale[s]} for s in scales},
            "sampler_sweep": by_sampler, "guidance_interval": by_interval, "relations": rel,
            "fd_real_reference": fd_real, "vae": vae_rows, "text_separation": sep, "caption_sensitivity": sens,
            "wall_s": time.perf_counter() - t0}
    write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", args.json)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
