"""Sliced Wasserstein distance to the true 2-D mixture vs NFE: our samplers beside the matching diffusers scheduler.

Both sides use the same analytic model (the mixture's exact eps in VP coordinates on Stable Diffusion's schedule),
the same start noise and, for ancestral samplers, the same seeded generator. Writes benchmarks/results/samplers.json,
samplers.md and samplers.png. Usage: python benchmarks/samplers.py [--n 4000] [--steps 5 10 20 40]
"""

from __future__ import annotations

import argparse
import sys
import io
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

from ldm.diffusion.samplers import SAMPLERS  # noqa: E402
from ldm.diffusion.schedule import NoiseSchedule  # noqa: E402
from ldm.diffusion.toy import mixture_2d  # noqa: E402
from ldm.io import write_bytes  # noqa: E402
from benchmarks.measure import write_report  # noqa: E402
from ldm.diffusion.toy import run_diffusers_scheduler, vp_eps_net  # noqa: E402

warnings.filterwarnings("ignore")
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          timestep_spacing="trailing", steps_offset=0)
# our sampler -> (its diffusers scheduler, constructor extras, step kwargs, NFE for n steps); the timesteps, final sigma,
# output coordinates and options (clip_x0, DDIM's step_to) come from the SAMPLERS entry's plan, as in the pipeline
CASES = {
    "ddpm": (DDPMScheduler, dict(clip_sample=False), {}, lambda n: n),
    "ddim": (DDIMScheduler, dict(clip_sample=False), {}, lambda n: n),
    "euler": (EulerDiscreteScheduler, {}, {}, lambda n: n),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}, {}, lambda n: n),
    "heun": (HeunDiscreteScheduler, {}, {}, lambda n: 2 * n - 1),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, {}, lambda n: n),
    "unipc": (UniPCMultistepScheduler, {}, {}, lambda n: n),
    "lms": (LMSDiscreteScheduler, {}, {}, lambda n: n),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), {}, lambda n: n),
    # ours takes k-diffusion's third-order coefficient, diffusers' makes the method first order (see
    # ldm/diffusion/samplers_dpmpp.py): the one row where the two columns are different samplers
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++", solver_order=3), {},
                     lambda n: n),
}
STOCHASTIC = {"ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
FLOAT32 = {"dpmpp_2m_sde", "dpmpp_3m_sde"}  # diffusers' DPM-Solver draws float32 noise: ours runs in float32 to match


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """SW_2(a, b) = sqrt(mean over random unit directions of W_2^2 of the 1-D projections) (Rabin et al. 2011)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    gmm = mixture_2d()
    truth = gmm.sample(args.n, torch.Generator().manual_seed(123))
    noise = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    floor = sliced_wasserstein(gmm.sample(args.n, torch.Generator().manual_seed(7)), truth)
    rows = []
    for name, (cls, extra, kw, nfe) in CASES.items():
        spec = SAMPLERS[name]
        for n in args.steps:
            plan = spec.plan(NoiseSchedule.from_diffusers({**SD, **extra}), n)  # the scheduler's config, as diffusers'
            sig, vp, table = plan.sigmas, spec.vp_output, plan.schedule.sigmas()
            x = noise * (1 + sig[0] ** 2).sqrt() if vp else noise * sig[0]
            start = noise.float() if name in FLOAT32 else noise
            x = x.float() if name in FLOAT32 else x
            ours = spec(plan.denoiser(vp_eps_net(gmm, table, "linear")), x, sig, generator=torch.Generator().manual_seed(1),
                        **plan.options)
            ours = spec.to_output(ours, float(sig[-1]))
            ref = run_diffusers_scheduler(cls(**SD, **extra), vp_eps_net(gmm, table, "linear"), start if vp else x, n,
                                generator=torch.Generator().manual_seed(1) if name in STOCHASTIC else None, **kw)
            ours = ours.to(torch.float64)
            rows.append(dict(sampler=name, steps=n, nfe=nfe(n), sw_ours=sliced_wasserstein(ours, truth),
                             sw_diffusers=sliced_wasserstein(ref.to(torch.float64), truth)))
            r = rows[-1]
            print(f"{name:16s} steps {n:3d} NFE {r['nfe']:3d}  SW ours {r['sw_ours']:.4f}  diffusers {r['sw_diffusers']:.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = dict(n_samples=args.n, sample_noise_floor=floor, schedule=SD, rows=rows)
    md = [f"# Samplers: sliced Wasserstein-2 to the 2-D mixture (n = {args.n}, noise floor {floor:.4f})", "",
          "| sampler | steps | NFE | SW ours | SW diffusers |", "|---|---|---|---|---|"]
    md += [f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['sw_ours']:.4f} | {r['sw_diffusers']:.4f} |" for r in rows]
    write_report(args.out, "samplers", report, "\n".join(md), echo=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(CASES):
        rs = [r for r in rows if r["sampler"] == name]
        ax.loglog([r["nfe"] for r in rs], [r["sw_ours"] for r in rs], "-o", color=f"C{i}", label=f"{name} (ours)")
        ax.loglog([r["nfe"] for r in rs], [r["sw_diffusers"] for r in rs], "--x", color=f"C{i}", label="diffusers")
    ax.axhline(floor, color="gray", lw=0.8, label="sample noise floor")
    ax.set_xlabel("NFE")
    ax.set_ylabel("sliced W2 to truth")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    write_bytes(png.getvalue(), args.out / "samplers.png")


if __name__ == "__main__":
    main()
