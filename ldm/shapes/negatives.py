"""Hard-negative captions for the shapes domain: a caption made false by changing exactly one thing it states.

Contrastive training with in-batch negatives only learns what tells random captions apart (in the shapes data,
mostly colour). NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models behave like bags-of-words")
adds, for each image, captions that differ from the true one in one attribute or in how attributes are bound, so
the text tower must encode shape, position, relation, count and binding too. Here a negative is written from the
parsed caption (ldm.shapes.captions.parse_caption), edited once and written back (ldm.shapes.captions.prompt_caption):

  colour    one object's colour -> another colour             "a red circle"            -> "a blue circle"
  shape     one object's shape -> another shape               "a red circle"            -> "a red star"
  position  a stated position -> another position             "... on the left"         -> "... at the top"
  count     a group's count 2 <-> 3                           "two red circles"         -> "three red circles"
  relation  the relation -> its opposite or a perpendicular one "A above B"             -> "A below B"
  swap      two objects' colours (binding)                    "a red circle above a blue square"
                                                              -> "a blue circle above a red square"
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ldm.shapes.captions import parse_caption, prompt_caption
from ldm.shapes.scenes import COLORS, POSITIONS, RELATIONS, SHAPES, Prompt

NEGATIVE_KINDS: tuple[str, ...] = ("colour", "shape", "position", "count", "relation", "swap")


def _other(rng: np.random.Generator, values: list[str], current: str | None) -> str:
    choices = [v for v in values if v != current]
    return choices[int(rng.integers(len(choices)))]


def _edits(p: Prompt) -> list[tuple[str, int]]:
    """(kind, object index) of every edit that makes a negative of p."""
    out: list[tuple[str, int]] = []
    for i, o in enumerate(p.objects):
        if o.color is not None:
            out.append(("colour", i))
        out.append(("shape", i))
        if o.position is not None:
            out.append(("position", i))
        if o.count > 1:
            out.append(("count", i))
    if p.relation is not None:
        out.append(("relation", 0))
    colours = [o.color for o in p.objects]
    if len(p.objects) >= 2 and None not in colours[:2] and colours[0] != colours[1] \
            and p.objects[0].shape != p.objects[1].shape:
        out.append(("swap", 0))
    return out


def applicable_kinds(p: Prompt) -> set[str]:
    """The kinds of negative that p admits (e.g. no "relation" for a single object)."""
    return {kind for kind, _ in _edits(p)}


def negative_prompt(p: Prompt, rng: np.random.Generator, kind: str | None = None) -> Prompt:
    """p with one stated thing changed (an edit of `_edits`, drawn uniformly; only edits of `kind` if given): a prompt
    false of any scene p is true of. Raises ValueError when p states nothing that `kind` can change."""
    if kind is not None and kind not in NEGATIVE_KINDS:
        raise ValueError(f"unknown negative kind {kind!r}; valid: {list(NEGATIVE_KINDS)}")
    edits = [e for e in _edits(p) if kind is None or e[0] == kind]
    if not edits:
        raise ValueError(f"{prompt_caption(p)!r} has no {kind} to change")
    kind, i = edits[int(rng.integers(len(edits)))]
    objects = list(p.objects)
    o = objects[i]
    if kind == "colour":
        objects[i] = dataclasses.replace(o, color=_other(rng, list(COLORS), o.color))
    elif kind == "shape":
        objects[i] = dataclasses.replace(o, shape=_other(rng, list(SHAPES), o.shape))
    elif kind == "position":
        objects[i] = dataclasses.replace(o, position=_other(rng, list(POSITIONS), o.position))
    elif kind == "count":
        objects[i] = dataclasses.replace(o, count=5 - o.count)  # 2 <-> 3
    elif kind == "relation":
        a, rel, b = p.relation  # type: ignore[misc]
        return dataclasses.replace(p, relation=(a, _other(rng, list(RELATIONS), rel), b))
    else:  # swap the first two objects' colours
        objects[0], objects[1] = (dataclasses.replace(objects[0], color=objects[1].color),
                                  dataclasses.replace(objects[1], color=objects[0].color))
    return dataclasses.replace(p, objects=tuple(objects))


def hard_negative(caption: str, rng: np.random.Generator) -> str:
    """A caption that differs from `caption` in exactly one stated attribute or binding (module docstring)."""
    return prompt_caption(negative_prompt(parse_caption(caption), rng))
