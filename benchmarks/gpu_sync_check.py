"""Host synchronisations per sampling step of our Pipeline on CUDA, for every sampler (issue 32, GPU hygiene).

    python benchmarks/gpu_sync_check.py [--out DIR]     # needs a CUDA device; a few seconds

The tiny random-weight model (the count does not depend on the model's size) runs each sampler at 4 and at 8 steps
under torch.cuda.set_sync_debug_mode("warn"); every synchronising CUDA call warns, and (syncs at 8 - syncs at 4) / 4
is the number per step: 0 means the loop can run ahead of the GPU and be captured whole. The calls before and after
the loop (prompt encoding, the sigma table, the one finiteness check, the image's copy to the host) are counted in
the totals. Writes gpu-sync.md and gpu-sync.json.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import write_report  # noqa: E402


def count_syncs(pipe, sampler: str, steps: int, **options) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pipe("a red circle", sampler=sampler, num_inference_steps=steps, seed=0, output_type="latent",
                 progress=False, **options)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    from ldm.diffusion.samplers import SAMPLERS
    from pipelines.text_to_image import Pipeline
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)
    pipe = Pipeline(c.unet, c.vae, c.text_encoder, c.schedule, device="cuda", dtype=torch.float16)
    pipe("a red circle", num_inference_steps=2, progress=False)  # warm-up
    rows = {}
    for name in sorted(SAMPLERS):
        if name in ("pc", "langevin", "reverse_sde"):  # score-SDE samplers: not pipeline samplers
            continue
        try:
            few, many = count_syncs(pipe, name, 4), count_syncs(pipe, name, 8)
            rows[name] = {"total_at_4": few, "total_at_8": many, "per_step": (many - few) / 4}
        except Exception as e:  # noqa: BLE001 - a report, not a test
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
    interval = {"guidance_interval": (0.5, 5.0)}
    few, many = count_syncs(pipe, "euler", 4, **interval), count_syncs(pipe, "euler", 8, **interval)
    rows["euler + guidance_interval"] = {"total_at_4": few, "total_at_8": many, "per_step": (many - few) / 4}
    lines = ["# Host synchronisations per sampling step (CUDA, tiny model, fp16)", "",
             "| sampler | syncs per call at 4 steps | at 8 steps | per step |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + (f"error: {r['error']} | | |" if "error" in r else
                                       f"{r['total_at_4']} | {r['total_at_8']} | {r['per_step']:g} |"))
    write_report(args.out, "gpu-sync", {"device": torch.cuda.get_device_name(), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
