"""How a model draws two-object relations (a section of benchmarks/quality.py): accuracy per relation word and what
the failures were (ldm.shapes.detect.relation_outcome), over several seeds per prompt."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np

from ldm.shapes import scenes as S
from ldm.shapes.captions import parse_caption
from ldm.shapes.detect import detect, relation_outcome

OUTCOMES = ("right", "swapped", "orthogonal", "missing")


def relation_breakdown(generate: Callable[[list[str], int], np.ndarray], prompts: list[str],
                       seeds: int) -> dict[str, dict[str, float]]:
    """{relation word (and "all"): {outcome: fraction, "n": images}} for `prompts` x `seeds` images;
    generate(prompts, seed) -> (N, H, W, 3) images in [0, 1]."""
    counts: dict[str, Counter] = {rel: Counter() for rel in (*S.RELATIONS, "all")}
    for k in range(seeds):
        for prompt, image in zip(prompts, generate(prompts, 1000 * k)):
            parsed = parse_caption(prompt)
            if parsed.relation is None:
                raise ValueError(f"relation_breakdown needs relation prompts, got {prompt!r}")
            outcome = relation_outcome(parsed, detect(image))
            for key in (parsed.relation[1], "all"):
                counts[key][outcome] += 1
    return {rel: {**{o: c[o] / max(1, sum(c.values())) for o in OUTCOMES}, "n": sum(c.values())}
            for rel, c in counts.items()}


def markdown(breakdown: dict[str, dict[str, float]]) -> list[str]:
    """relation_breakdown's result as Markdown table lines (percentages)."""
    rows = ["| relation | n | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 2) + "|"]
    return rows + [f"| {rel} | {int(r['n'])} | " + " | ".join(f"{100 * r[o]:.0f}%" for o in OUTCOMES) + " |"
                   for rel, r in breakdown.items()]
