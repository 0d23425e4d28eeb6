"""Guidance kinds and learned variances on the shapes models (issue 28): writes benchmarks/results/guidance.md + .json.

(a) On the bundled model: classifier-free guidance alone, CLIP guidance alone (GLIDE, a noise-aware CLIP), CFG + CLIP
    guidance, and classifier guidance of unconditional sampling (prompt "", label = a colour; Dhariwal & Nichol 2021)
    at a few scales. Adherence by the detector (ldm.shapes.detect) on single-object prompts: the colour share (the
    largest detected object has the prompt's colour: the only thing the colour classifier is told, so the one measure
    all rows share) and, for the rows that see the prompt, the all-correct rate; and the Frechet distance in the small
    CLIP's image-feature space to the test-seen images (as benchmarks/quality.py computes it).
(b) On the learned-variance fine-tune (ldm.shapes.learned_variance): bits/dim of the discrete-time ELBO (Ho et al.
    eq. 5; ldm.diffusion.process.vlb_terms) on test latents with the learned head vs fixed beta_t vs fixed beta~_t, the
    same network and noise draws; and DDPM adherence + FD at 10 / 25 / 50 steps with each variance, same seeds.

    python benchmarks/guidance.py                  # full run (about 13 minutes on one thread)
    python benchmarks/guidance.py --quick          # a smoke run (about a minute)
    python benchmarks/guidance.py --kinds clip,cfg+clip --no-variances --out benchmarks/results/guidance-clip.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.quality import _pct, _shown, generate, single_prompts, test_images  # noqa: E402
from benchmarks.quality_metrics import clip_features, fd, summarize  # noqa: E402
from ldm.diffusion.process import vlb_terms  # noqa: E402
from ldm.shapes.captions import parse_caption  # noqa: E402
from ldm.shapes.detect import detect, score_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CFG_WITH_CLIP = 3.0  # the CFG scale of the "CFG + CLIP" rows
VARIANCES = {"learned": None, "fixed beta~_t": -1.0, "fixed beta_t": 1.0}  # the head's v (learned_range, eq. 15)
VARIANCE_GUIDANCE = 1.0  # table (b) samples without CFG, as Nichol & Dhariwal measure their fewer-steps claim


# ------------------------------------------------------------------------------------------- (a) guidance kinds


@dataclass(frozen=True)
class GuidanceRow:
    """One row of table (a): `kind` cfg | clip | cfg+clip | clip-uncond | classifier at `scale` (the CFG scale for
    cfg, else the CLIP-guidance or classifier scale). clip-uncond and classifier sample unconditionally (prompt "")
    and steer toward the prompt by CLIP (h(c) = the prompt) or toward its colour by the classifier."""

    kind: str
    scale: float

    @property
    def name(self) -> str:
        return {"cfg": f"CFG s = {self.scale:g}", "clip": f"CLIP guidance {self.scale:g} (s = 1)",
                "cfg+clip": f"CFG s = {CFG_WITH_CLIP:g} + CLIP guidance {self.scale:g}",
                "clip-uncond": f"CLIP guidance {self.scale:g} (prompt \"\", clip_prompt = the prompt)",
                "classifier": f"classifier {self.scale:g} (prompt \"\", s = 1)"}[self.kind]

    def call(self, prompts: list[str], labels: list[str]) -> tuple[list[str], float, dict[str, Any]]:
        """(the prompts the pipeline sees, its guidance_scale, its guidance options) for these prompts, whose colours
        are `labels` (used by the classifier rows only, which sample unconditionally)."""
        if self.kind == "cfg":
            return prompts, self.scale, {}
        if self.kind in ("clip", "cfg+clip"):
            return prompts, 1.0 if self.kind == "clip" else CFG_WITH_CLIP, {
                "clip_guidance_scale": self.scale, "noisy_clip": "default"}
        if self.kind == "clip-uncond":
            return [""] * len(prompts), 1.0, {"clip_guidance_scale": self.scale, "noisy_clip": "default",
                                              "clip_prompt": list(prompts)}
        if self.kind == "classifier":
            return [""] * len(prompts), 1.0, {"classifier": "default", "label": list(labels),
                                              "classifier_scale": self.scale}
        raise ValueError(f"unknown guidance kind {self.kind!r}; valid: cfg, clip, cfg+clip, clip-uncond, classifier")


def guidance_rows(quick: bool) -> list[GuidanceRow]:
    """Table (a)'s rows; CLIP scales are in units of the cosine g . h, useful at about 30-100 (docs/guidance.md)."""
    cfg, clip, cls = ([1.0, 3.0], [100.0], [0.0, 8.0]) if quick else ([1.0, 3.0, 5.0], [30.0, 100.0], [0.0, 2.0, 8.0])
    return ([GuidanceRow("cfg", s) for s in cfg] + [GuidanceRow(k, s) for k in ("clip", "cfg+clip") for s in clip]
            + [GuidanceRow("clip-uncond", s) for s in clip] + [GuidanceRow("classifier", s) for s in cls])


def prompt_colour(caption: str) -> str:
    """The colour a caption states for its first object (a ValueError when it states none)."""
    colour = parse_caption(caption).objects[0].color
    if colour is None:
        raise ValueError(f"caption {caption!r} states no colour for its first object")
    return colour


def largest_colour(image: np.ndarray) -> str | None:
    """The colour of the largest detected object (None when nothing is detected)."""
    found = detect(image)
    return found[0].color if found else None


def colour_share(labels: list[str], images: np.ndarray) -> float:
    """The share of images whose largest detected object has the label's colour (docs/guidance.md's measure)."""
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    return float(np.mean([largest_colour(im) == lab for lab, im in zip(labels, images)]))


def clip_guidance_available(model: str) -> str | None:
    """None when the model folder has a noise-aware CLIP (noisy_clip/) and the Pipeline takes clip_guidance_scale,
    else why the CLIP rows are skipped."""
    import inspect

    from pipelines.text_to_image import Pipeline

    if "clip_guidance_scale" not in inspect.signature(Pipeline.__call__).parameters:
        return "this Pipeline has no clip_guidance_scale option"
    if not (Path(model) / "noisy_clip").is_dir():
        return f"{_shown(model)} has no noisy_clip/ folder (no noise-aware CLIP)"
    return None


def guidance_table(pipe: Any, clip: Any, rows: list[GuidanceRow], adherence_prompts: list[str],
                   fd_captions: list[str], fd_labels: list[str], f_real: torch.Tensor, **gen: Any) -> list[dict]:
    """Each row's colour share and all-correct rate on `adherence_prompts` and FD of the images for `fd_captions`
    (labels `fd_labels` for the classifier rows) against the real features `f_real`."""
    out = []
    labels = [prompt_colour(p) for p in adherence_prompts]
    for row in rows:
        t = time.perf_counter()
        prompts, s, options = row.call(adherence_prompts, labels)
        images = generate(pipe, prompts, guidance=s, batch=len(prompts), **gen, **options)
        all_correct = None if row.kind == "classifier" else summarize(
            [score_image(p, im) for p, im in zip(adherence_prompts, images)])["all"]
        prompts, s, options = row.call(fd_captions, fd_labels)
        f_gen = clip_features(clip, generate(pipe, prompts, guidance=s, batch=len(prompts), **gen, **options))
        out.append({"row": row.name, "kind": row.kind, "scale": row.scale, "colour_share": colour_share(labels, images),
                    "all_correct": all_correct, "fd": fd(f_gen, f_real), "s": time.perf_counter() - t})
        print(out[-1], flush=True)
    return out


# ------------------------------------------------------------------------------------------ (b) learned variances


def constant_head(unet: torch.nn.Module, v: float) -> torch.nn.Module:
    """A copy of a U-Net with a variance head whose head outputs v everywhere (conv_out's variance rows: weights 0,
    biases v): with learned_range, v = -1 is beta~_t and v = +1 is beta_t (eq. 15), the prediction unchanged."""
    import copy

    c = unet.config.in_channels
    if unet.config.out_channels != 2 * c:
        raise ValueError(f"the U-Net returns {unet.config.out_channels} channels for {c} inputs: it has no variance "
                         "head")
    fixed = copy.deepcopy(unet)
    with torch.no_grad():
        fixed.conv_out.weight[c:] = 0
        fixed.conv_out.bias[c:] = v
    return fixed


class SameDrawOutputs:
    """model_fn(x_t, t) for vlb_terms that runs the network once per timestep: bounds computed with the same
    generator seed draw the same x_t, so the second and later ones reuse the first's outputs (checked: equal x_t)."""

    def __init__(self, net: Any) -> None:
        self.net, self.seen, self.calls = net, {}, 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = int(t[0])
        hit = self.seen.get(key)
        if hit is not None and torch.equal(hit[0], x_t):
            return hit[1]
        self.calls += 1
        with torch.no_grad():
            out = self.net(x_t, t)
        self.seen[key] = (x_t.clone(), out)
        return out


def elbo_table(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, z0: torch.Tensor, text: torch.Tensor,
               prediction: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """Bits per latent dimension of the negative ELBO (continuous decoder) of latents z0 given their text, with the
    learned head ("learned_range"), beta~_t ("fixed_small") and beta_t ("fixed_large"), same x_t draws; each split
    into prior L_T, the KL terms t >= 1 and the decoder L_0. The U-Net runs in its dtype, the bound in z0's."""
    c = z0.shape[1]
    dtype = unet.conv_out.weight.dtype  # the network in its own dtype, the bound's arithmetic in z0's

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dtype), t, encoder_hidden_states=text.to(dtype)).to(z0.dtype)

    memo = SameDrawOutputs(net)
    readings = {"learned": ("learned_range", memo),
                "fixed beta~_t": ("fixed_small", lambda x, t: memo(x, t)[:, :c]),
                "fixed beta_t": ("fixed_large", lambda x, t: memo(x, t)[:, :c])}
    out = {}
    for name, (variance, fn) in readings.items():
        vlb = vlb_terms(fn, z0, alphas_cumprod, prediction=prediction, variance=variance, decoder="continuous",
                        generator=torch.Generator().manual_seed(seed))
        per_dim = float(np.log(2)) * vlb.dims
        out[name] = {"bpd": float(vlb.bpd.mean()), "prior": float(vlb.prior.mean() / per_dim),
                     "kl": float(vlb.terms[:, 1:].sum(1).mean() / per_dim),
                     "kl_t_le_10": float(vlb.terms[:, 1:11].sum(1).mean() / per_dim),
                     "decoder": float(vlb.terms[:, 0].mean() / per_dim)}
    out["network_calls"] = {"n": memo.calls}
    return out


@dataclass
class VarianceRuns:
    """The pipelines of table (b): the fine-tune itself (learned) and its copies with a constant head."""

    pipes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, pipe: Any) -> VarianceRuns:
        from pipelines.text_to_image import Pipeline

        runs = cls()
        for name, v in VARIANCES.items():
            runs.pipes[name] = pipe if v is None else Pipeline(constant_head(pipe.unet, v), pipe.vae, pipe.text_encoder,
                                                               pipe.schedule, device="cpu", dtype=torch.float32)
        return runs


def fewer_steps_verdict(rows: list[dict], tolerance: float = 0.0) -> str:
    """For each step count: the learned head's FD and the fewest steps at which each fixed variance does as well
    (FD at most the learned one's + `tolerance`, the FD's sampling noise); the paper's fewer-steps claim holds there
    when every fixed variance needs more steps."""
    fixed = sorted({r["variance"] for r in rows} - {"learned"})
    most = max(r["steps"] for r in rows)
    notes, holds = [], 0
    for r in sorted((r for r in rows if r["variance"] == "learned"), key=lambda r: r["steps"]):
        reach = {v: min((x["steps"] for x in rows if x["variance"] == v and x["fd"] <= r["fd"] + tolerance),
                        default=None) for v in fixed}
        ok = all(n is None or n > r["steps"] for n in reach.values())
        holds += ok
        where = ", ".join(f"{v} at {f'more than {most}' if n is None else n} steps" for v, n in reach.items())
        notes.append(f"learned at {r['steps']} steps (FD {r['fd']:.3f}): as good as {where}: "
                     f"{'fewer steps' if ok else 'no saving'}")
    return f"holds at {holds} of {len(notes)} step counts. " + "; ".join(notes)


# ----------------------------------------------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    from ldm.io import write_text
    from ldm.loading.sources import DEFAULT_MODEL
    from ldm.training.clip import load_clip
    from pipelines.text_to_image import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="table (a)'s pipeline folder (with clip/)")
    parser.add_argument("--learned", default=str(ROOT / "runs" / "learned-variance" / "pipeline"),
                        help="table (b)'s learned-variance folder (ldm.shapes.learned_variance)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampler", default="euler", help="table (a)'s sampler")
    parser.add_argument("--steps", type=int, default=10, help="table (a)'s steps")
    parser.add_argument("--kinds", default="cfg,clip,cfg+clip,clip-uncond,classifier",
                        help="table (a)'s guidance kinds")
    parser.add_argument("--no-variances", action="store_true", help="skip table (b)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guidance.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, q = time.perf_counter(), args.quick
    n_adh, n_fd, n_elbo = (8, 16, 2) if q else (96, 192, 32)
    clip = load_clip(Path(args.model) / "clip", text_encoder_folder=args.model)
    seen_x, seen_c = test_images(n_fd, "train", 1)
    train_x, _ = test_images(n_fd, "train", 0)
    f_seen = clip_features(clip, seen_x)
    fd_real = fd(clip_features(clip, train_x), f_seen)
    fd_labels = [largest_colour(x) for x in seen_x]  # clean renders: the detector is exact on them
    if None in fd_labels:
        raise RuntimeError(f"the detector found no object in test-seen image {fd_labels.index(None)}")
    lines = [f"# Guidance kinds and learned variances ({'quick' if q else 'full'} run of benchmarks/guidance.py)", "",
             f"FD: {n_fd} generated images for the test-seen captions vs the {n_fd} test-seen images in the small "
             f"CLIP's image-feature space (benchmarks/quality.py's FD); train vs test-seen at the same N: "
             f"{fd_real:.3f}. Image i has seed i.", ""]
    data: dict[str, Any] = {"quick": q, "n_adherence": n_adh, "n_fd": n_fd, "fd_real_reference": fd_real}

    # (a) guidance kinds on the bundled model
    pipe = Pipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    rows = [r for r in guidance_rows(q) if r.kind in args.kinds.split(",")]
    skip = clip_guidance_available(args.model)
    if skip is not None:
        print(f"CLIP guidance rows skipped: {skip}", flush=True)
        rows = [r for r in rows if "clip" not in r.kind]
    gen = {"sampler": args.sampler, "steps": args.steps}
    table = guidance_table(pipe, clip, rows, single_prompts(n_adh, False), seen_c, fd_labels, f_seen, **gen)
    lines += [f"## (a) Guidance kinds on `{_shown(args.model)}` ({args.sampler}, {args.steps} steps)", "",
              f"Adherence on {n_adh} single-object seen-pair prompts (benchmarks/quality.py's): colour share = the "
              "largest detected object has the prompt's colour (for the classifier rows, which sample "
              "unconditionally with label = that colour, the only adherence there is); all-correct = every stated "
              "attribute (not defined for the classifier rows: only the colour steers them; the unconditional CLIP "
              "rows are scored against their clip_prompt). FD: the classifier rows label image i with the colour of "
              "test-seen image i's largest object. s: seconds for the row's images (adherence + FD sets).", "",
              "| guidance | colour share | all-correct | FD | s |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {_pct(r['colour_share'])} | "
              f"{'–' if r['all_correct'] is None else _pct(r['all_correct'])} | {r['fd']:.3f} | {r['s']:.0f} |"
              for r in table]
    if skip is not None:
        lines += ["", f"CLIP guidance rows not run: {skip}."]
    data["guidance"] = {"sampler": args.sampler, "steps": args.steps, "rows": table, "clip_skipped": skip}

    # (b) learned vs fixed variances on the fine-tune
    if args.no_variances:
        data["variances"] = {"skipped": "--no-variances"}
    elif not (Path(args.learned) / "model_index.json").is_file():
        msg = f"{args.learned} does not exist: run python -m ldm.shapes.learned_variance --out runs/learned-variance"
        print(f"table (b) skipped: {msg}", flush=True)
        lines += ["", f"## (b) Learned variances: not run ({msg})"]
        data["variances"] = {"skipped": msg}
    else:
        lines += variance_section(args.learned, clip, seen_c, f_seen, n_elbo, q, data)
    lines += ["", f"Total wall time: {time.perf_counter() - t0:.0f} s ({args.threads} thread(s)).", ""]
    data["wall_s"] = time.perf_counter() - t0
    write_text("\n".join(lines), args.out)
    write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", Path(args.out).with_suffix(".json"))
    print("\n".join(lines))
    return 0


def variance_section(folder: str, clip: Any, seen_c: list[str], f_seen: torch.Tensor, n_elbo: int, quick: bool,
                     data: dict[str, Any]) -> list[str]:
    """Table (b): the ELBO with each variance, then DDPM adherence + FD at each step count (no CFG)."""
    from pipelines.text_to_image import Pipeline

    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    elbo_x, elbo_c = test_images(n_elbo, "train", 1)  # the first test-seen images
    x = torch.from_numpy(elbo_x).float().permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        z0 = pipe.vae.scale_latents(pipe.vae.encode(x).mode()).double()
        text = pipe.text_encoder.encode(elbo_c)
    t = time.perf_counter()
    elbo = elbo_table(pipe.unet, pipe.schedule.alphas_cumprod().double(), z0, text, pipe.schedule.prediction_type)
    elbo_s = time.perf_counter() - t
    lines = ["", f"## (b) Learned vs fixed variances on `{_shown(folder)}`", "",
             f"Negative ELBO (Ho et al. eq. 5, ldm.diffusion.process.vlb_terms, all 1000 timesteps, one x_t draw per "
             f"term, the same draws for every column) of the posterior-mean latents of {n_elbo} test-seen images "
             "given their captions, in bits per latent dimension (continuous Gaussian decoder: a density of the "
             "scaled latents, comparable only within this table; the U-Net in float32, the bound in float64, "
             f"{elbo_s:.0f} s).", "",
             "| variance | bits/dim | prior L_T | sum of KL t >= 1 | of which t <= 10 | decoder L_0 |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['bpd']:.4f} | {v['prior']:.4f} | {v['kl']:.4f} | {v['kl_t_le_10']:.4f} | "
              f"{v['decoder']:.4f} |" for k, v in elbo.items() if k != "network_calls"]
    runs = VarianceRuns.of(pipe)
    rows = []
    for steps in ([10, 25] if quick else [10, 25, 50]):
        for name, p in runs.pipes.items():
            t = time.perf_counter()
            images = generate(p, seen_c, guidance=VARIANCE_GUIDANCE, sampler="ddpm", steps=steps, batch=len(seen_c))
            rows.append({"variance": name, "steps": steps, "fd": fd(clip_features(clip, images), f_seen),
                         "all_correct": summarize([score_image(c, im) for c, im in zip(seen_c, images)])["all"],
                         "s": time.perf_counter() - t})
            print(rows[-1], flush=True)
    lines += ["", f"DDPM at guidance_scale {VARIANCE_GUIDANCE:g} (no CFG, the paper's setting) on the "
              f"{len(seen_c)} test-seen captions, the same seeds in every row: all-correct by the detector (single "
              "and two-object captions mixed) and FD. The fixed rows are the same "
              "network with its head replaced by a constant (v = -1: beta~_t, v = +1: beta_t).", "",
              "| steps | variance | all-correct | FD |", "|---|---|---|---|"]
    lines += [f"| {r['steps']} | {r['variance']} | {_pct(r['all_correct'])} | {r['fd']:.3f} |" for r in rows]
    t = time.perf_counter()  # FD's sampling noise: one row again with other seeds
    again = generate(runs.pipes["learned"], seen_c, guidance=VARIANCE_GUIDANCE, sampler="ddpm", steps=25,
                     batch=len(seen_c), seed=10_000)
    noise = {"fd": fd(clip_features(clip, again), f_seen), "s": time.perf_counter() - t,
             "all_correct": summarize([score_image(c, im) for c, im in zip(seen_c, again)])["all"]}
    first = next(r for r in rows if r["variance"] == "learned" and r["steps"] == 25)
    tol = abs(noise["fd"] - first["fd"])
    lines += ["", f"Sampling noise: the learned row at 25 steps again with seeds 10000 + i gives FD {noise['fd']:.3f} "
              f"and all-correct {_pct(noise['all_correct'])} (vs {first['fd']:.3f} / {_pct(first['all_correct'])}): "
              "differences of that size between rows are noise.", "",
              f"Fewer steps (Nichol & Dhariwal's claim; 'as good' = FD within the noise {tol:.3f} of the learned "
              "one's): " + fewer_steps_verdict(rows, tol) + "."]
    data["variances"] = {"model": _shown(folder), "n_elbo": n_elbo, "elbo": elbo, "elbo_s": elbo_s, "ddpm": rows,
                         "ddpm_other_seeds": noise}
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
