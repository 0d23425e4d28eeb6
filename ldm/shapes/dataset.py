"""The captioned-shapes dataset: item `index` of a (seed, split) as image, caption and scene, and its export as a
Hugging Face image folder (PNGs + metadata.jsonl), so the default model trains through the same path as user data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.io import atomic_directory
from ldm.shapes.captions import caption, parse_caption
from ldm.shapes.scenes import (
    RELATION_STATED,
    SPLITS,
    Scene,
    check_layouts,
    check_relation_stated,
    is_held_out,
    render,
    sample_scene,
)


def dataset_item(seed: int, split: str, index: int, size: int = 64, layouts: dict[str, float] | None = None,
                 relation_stated: float = RELATION_STATED) -> tuple[Image.Image, str, Scene]:
    """Image, caption and scene of item `index`: a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    scene = sample_scene(rng, split, layouts=layouts)
    return render(scene, size), caption(scene, rng, relation_stated), scene


def export_imagefolder(out_dir: str | Path, n: int, split: str, seed: int, size: int = 64, overwrite: bool = False,
                       layouts: dict[str, float] | None = None, relation_stated: float = RELATION_STATED) -> Path:
    """Write n items as PNGs + metadata.jsonl (Hugging Face imagefolder layout) atomically; same seed, same bytes.
    `layouts` reweights the scene layouts (default LAYOUTS), e.g. {"relation": 0.6, "single": 0.4};
    `relation_stated` is how often a two-object caption states the relation.

    Each metadata line has "file_name", "text", "split", "held_out", "scene" (Scene.to_dict) and "prompt" (the
    caption's parsed attributes). Load with datasets.load_dataset("imagefolder", data_dir=out_dir, split="train").
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if layouts is not None:
        check_layouts(layouts)  # before anything is written
    check_relation_stated(relation_stated)
    with atomic_directory(out_dir, may_replace=lambda p: overwrite) as tmp:
        lines = []
        for i in range(n):
            image, text, scene = dataset_item(seed, split, i, size, layouts, relation_stated)
            name = f"{i:06d}.png"
            image.save(tmp / name, format="PNG")
            lines.append(json.dumps({"file_name": name, "text": text, "split": split, "held_out": is_held_out(scene),
                                     "scene": scene.to_dict(), "prompt": parse_caption(text).to_dict()}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out_dir
