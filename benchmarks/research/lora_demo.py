"""A LoRA teaches the bundled model a combination it never saw: "purple cross" is one of the shapes world's held-out
(colour, shape) pairs (ldm.shapes.scenes.HELD_OUT_PAIRS), absent from every training image of the bundled model.

A small captioned folder of single purple crosses (rendered by ldm.shapes from the test split), a LoRA of the
bundled U-Net trained on it on CPU (train-quickstart.yaml + lora), its export, and the detector's per-attribute
accuracy (ldm.shapes.detect.score_image) on "a purple cross" prompts before and after loading the LoRA, with a
control set of seen pairs to show what the LoRA costs elsewhere. Writes benchmarks/research/results/lora-demo.md.

    OMP_NUM_THREADS=1 python benchmarks/research/lora_demo.py          # ~3.5 min of training on 1 CPU thread
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import write_report  # noqa: E402
from benchmarks.quality import generate  # noqa: E402
from benchmarks.quality_metrics import summarize  # noqa: E402
from ldm.shapes.dataset import dataset_item  # noqa: E402
from ldm.shapes.detect import score_image  # noqa: E402

PAIR = ("purple", "cross")
CONTROL = ["a red circle", "a blue square", "a green star", "a yellow triangle"]  # seen pairs


def write_folder(out: Path, n: int) -> Path:
    """n single-object test-split scenes whose object is the held-out pair, as an imagefolder with captions."""
    out.mkdir(parents=True, exist_ok=True)
    lines, i = [], 0
    while len(lines) < n:
        image, caption, scene = dataset_item(0, "test", i, 64, layouts={"single": 1.0})
        i += 1
        if (scene.objects[0].color, scene.objects[0].shape) != PAIR:
            continue
        name = f"{len(lines):04d}.png"
        image.save(out / name)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/lora-demo")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples", type=int, default=64, help="images per prompt set")
    parser.add_argument("--scales", default="1.0,0.5", help="LoRA scales to evaluate after training")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/research/results"))
    args = parser.parse_args(argv)
    from ldm.training.config import TrainConfig, load_train_config
    from ldm.training.export import export_lora
    from ldm.training.unet import train
    from pipelines import Pipeline

    work = Path(args.work)
    data = write_folder(work / "data", args.images)
    config = load_train_config(TrainConfig, ROOT / "ldm/configs/train-quickstart.yaml", [
        f"data.path={data}", f"run.output_dir={work / 'run'}", f"run.max_steps={args.steps}",
        f"run.checkpoint_every={args.steps}", "run.validate_every=0", "run.progress_bar=false", "run.batch_size=8",
        f"lora.rank={args.rank}", f"optim.lr={args.lr}", "optim.warmup_steps=10"])
    t0 = time.perf_counter()
    train(config)
    minutes = (time.perf_counter() - t0) / 60
    lora = export_lora(work / "run", work / "purple-cross.safetensors", overwrite=True)
    pipe = Pipeline.from_pretrained(work / "run/frozen")
    gen = {"guidance": 5.0, "sampler": "euler", "steps": 20}
    sets = {"purple cross": ["a purple cross"] * args.samples,
            "seen pairs (control)": [p for p in CONTROL for _ in range(args.samples // len(CONTROL))]}
    rows, name = {}, None
    for when in ["before", *(float(s) for s in args.scales.split(","))]:
        if when != "before":
            name = name or pipe.load_lora(lora)
            pipe.set_lora_scale(name, when)
        for prompts_name, prompts in sets.items():
            images = generate(pipe, prompts, **gen)
            label = when if when == "before" else f"with the LoRA at scale {when:g}"
            rows[f"{prompts_name}, {label}"] = summarize([score_image(p, im) for p, im in zip(prompts, images)])
    md = ["| prompts | colour right | shape right | all right | n |", "|---|---|---|---|---|"]
    md += [f"| {k} | {r['color']:.0%} | {r['shape']:.0%} | {r['all']:.0%} | {r['n']} |" for k, r in rows.items()]
    md.append(f"\nLoRA rank {args.rank} (to_q, to_k, to_v, to_out.0) of the bundled U-Net, {args.steps} updates of batch "
              f"8 at lr {args.lr} on {args.images} captioned purple crosses ({minutes:.1f} min on this CPU), "
              f"{lora.stat().st_size / 1024:.0f} KiB; detector (ldm.shapes.detect) on {args.samples} seeds per set, "
              "Euler 20 steps, guidance 5.")
    write_report(Path(args.out), "lora-demo", {"rows": rows, "steps": args.steps, "rank": args.rank,
                                                "train_minutes": minutes}, "\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
