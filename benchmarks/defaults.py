"""Which sampler, step count, sigma schedule (and feature cache) should the Pipeline default to? Prompt adherence of
the bundled default model against cost, measured, for the choice of `Pipeline()`'s and `ldm generate`'s defaults.

    python benchmarks/defaults.py            # about 10 minutes on 2 idle cores
    python benchmarks/defaults.py --quick    # 24 + 24 prompts, fewer candidates

Every candidate generates one image for each prompt of the same sets (benchmarks/quality.py: single-object and
two-object prompts over seen colour-shape pairs, prompt i with seed i, guidance 7.5) and the analytic detector scores
them (ldm.shapes.detect, GenEval-style all-correct). Cost: U-Net evaluations per image (NFE; a cached call counts as
a full one, so caching shows in seconds only) and measured seconds per image of the batched generation in this run.

Rule: the best adherence is the highest mean of the two all-correct rates; a candidate is "within noise" when its
mean is no lower than the best's minus 1.96 standard errors of a paired difference (the same prompts and seeds;
per-prompt correctness differences, their standard deviation over the prompts / sqrt(n)). The default is the
within-noise candidate with the fewest NFE (ties: the one without extra options, i.e. the model's own sigma
schedule and no cache, which holds for any model; then the higher mean). Writes benchmarks/results/defaults.md and .json.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.measure import write_report  # noqa: E402

GUIDANCE = 7.5


@dataclass
class Candidate:
    sampler: str
    steps: int
    options: dict[str, Any] = field(default_factory=dict)  # sigma_schedule, cache_interval, ...

    @property
    def label(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.options.items())
        return f"{self.sampler} {self.steps}{extra}"


def candidates(quick: bool) -> list[Candidate]:
    if quick:
        return [Candidate("dpmpp_2m", 30), Candidate("euler", 10), Candidate("unipc", 8)]
    out = [Candidate("dpmpp_2m", s) for s in (30, 20, 15, 10)]
    out += [Candidate("euler", s) for s in (20, 15, 10, 8)]
    out += [Candidate("unipc", s) for s in (15, 10, 8, 6)]
    out += [Candidate("dpmpp_2m", 10, {"sigma_schedule": "karras"}), Candidate("unipc", 8, {"sigma_schedule": "karras"}),
            Candidate("euler", 10, {"sigma_schedule": "ays_sd15"}), Candidate("dpmpp_2m", 10, {"sigma_schedule": "ays_sd15"}),
            Candidate("unipc", 10, {"sigma_schedule": "ays_sd15"}), Candidate("dpmpp_2m_sde", 15),
            Candidate("euler", 15, {"cache_interval": 2}), Candidate("unipc", 10, {"cache_interval": 2})]
    return out


def nfe(pipe: Any, cand: Candidate) -> int:
    """U-Net evaluations per image: one batched (guided) call per model evaluation of the sampler."""
    calls = []
    original = pipe.unet.forward

    def counting(*a: Any, **k: Any) -> torch.Tensor:
        calls.append(1)
        return original(*a, **k)

    pipe.unet.forward = counting
    try:
        pipe("a red circle", sampler=cand.sampler, num_inference_steps=cand.steps, seed=0, output_type="latent",
             progress=False, guidance_scale=GUIDANCE, **cand.options)
    finally:
        del pipe.unet.forward
    return len(calls)


def correctness(pipe: Any, cand: Candidate, prompts: list[str], batch: int) -> tuple[np.ndarray, float]:
    """Per-prompt all-correct (0/1) and seconds per image."""
    from ldm.shapes.detect import score_image

    right, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        out = pipe(chunk, sampler=cand.sampler, num_inference_steps=cand.steps, guidance_scale=GUIDANCE,
                   seed=list(range(i, i + len(chunk))), output_type="np", progress=False, **cand.options)
        right += [float(score_image(p, im)["all"]) for p, im in zip(chunk, np.asarray(out.images, np.float64))]
    return np.array(right), (time.perf_counter() - t0) / len(prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--n-single", type=int, default=96)
    p.add_argument("--n-pair", type=int, default=96)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--only", nargs="+", default=None, help="candidate labels to run (e.g. 'euler 10')")
    p.add_argument("--stem", default="defaults", help="report name: <out>/<stem>.md and .json")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    from benchmarks.quality import pair_prompts, single_prompts
    from pipelines.text_to_image import Pipeline

    n_single, n_pair = (24, 24) if args.quick else (args.n_single, args.n_pair)
    sets = {"single": single_prompts(n_single, False), "two objects": pair_prompts(n_pair, False)}
    pipe = Pipeline(device="cpu", dtype=getattr(torch, args.dtype))
    rows = []
    chosen_candidates = [c for c in candidates(args.quick) if args.only is None or c.label in args.only]
    for cand in chosen_candidates:
        per_set, seconds = {}, []
        for name, prompts in sets.items():
            right, sec = correctness(pipe, cand, prompts, args.batch)
            per_set[name], seconds = right, seconds + [sec]
        row = {"candidate": asdict(cand), "label": cand.label, "nfe": nfe(pipe, cand),
               "seconds_per_image": float(np.mean(seconds)),
               "rates": {k: float(v.mean()) for k, v in per_set.items()},
               "per_prompt": {k: v.tolist() for k, v in per_set.items()}}
        row["mean"] = float(np.mean(list(row["rates"].values())))
        rows.append(row)
        print(f"{cand.label:40s} NFE {row['nfe']:3d}  {row['seconds_per_image']:.3f} s/img  "
              + "  ".join(f"{k} {v:.0%}" for k, v in row["rates"].items()), flush=True)
    best = max(rows, key=lambda r: r["mean"])

    def paired_se(a: dict, b: dict) -> float:
        """Standard error of mean_a - mean_b, the mean of the sets' rates: per-set paired differences."""
        var = sum(np.var(np.array(a["per_prompt"][k]) - np.array(b["per_prompt"][k]), ddof=1) / len(a["per_prompt"][k])
                  for k in sets)
        return float(math.sqrt(var)) / len(sets)

    for r in rows:
        r["gap_to_best"] = best["mean"] - r["mean"]
        r["se_of_gap"] = paired_se(best, r)
        r["within_noise"] = r["gap_to_best"] <= 1.96 * r["se_of_gap"] + 1e-12
    chosen = min((r for r in rows if r["within_noise"]),
                 key=lambda r: (r["nfe"], bool(r["candidate"]["options"]), -r["mean"]))
    lines = ["# Choosing the defaults: adherence of the bundled model against cost", "",
             f"{n_single} single-object and {n_pair} two-object seen prompts (benchmarks/quality.py's sets), one image "
             f"each (prompt i, seed i), guidance {GUIDANCE}, {args.dtype}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {platform.platform()}. Within noise: the gap to the best mean is at most 1.96 "
             "paired standard errors.", "",
             "| candidate | NFE | s / image | single | two objects | mean | gap to best (SE) | within noise |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["nfe"], -r["mean"])):
        mark = "**chosen**" if r is chosen else ("yes" if r["within_noise"] else "")
        lines.append(f"| {r['label']} | {r['nfe']} | {r['seconds_per_image']:.3f} | {r['rates']['single']:.0%} | "
                     f"{r['rates']['two objects']:.0%} | {r['mean']:.1%} | {r['gap_to_best']:+.1%} "
                     f"({r['se_of_gap']:.1%}) | {mark} |")
    lines += ["", f"Best mean: {best['label']} ({best['mean']:.1%}). Chosen: **{chosen['label']}** "
              f"({chosen['nfe']} NFE, {chosen['mean']:.1%})."]
    write_report(args.out, args.stem, {"rows": rows, "best": best["label"], "chosen": chosen["label"],
                                        "n_single": n_single, "n_pair": n_pair}, "\n".join(lines))


if __name__ == "__main__":
    main()
