"""Captions of ldm.shapes.scenes scenes: the caption writer (random templates, true of the scene) and its parser.

Caption grammar (what `caption` writes and `parse_caption` reads; every object in the scene is mentioned):
  caption  := group ( REL group | (", " group)* " and " group )? [" on a " BACKGROUND " background"]
  group    := ("a" | "an" | "two" | "three") [SIZE] [COLOUR] SHAPE["s"] [POSITION]
  POSITION := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
  REL      := "above" | "below" | "to the left of" | "to the right of"   ("left of", "right of" also parse)
"""

from __future__ import annotations

import numpy as np

from ldm.shapes.scenes import (
    BACKGROUNDS,
    COLORS,
    PLURALS,
    POSITION_PHRASES,
    POSITION_STATED,
    RELATION_PHRASES,
    RELATION_STATED,
    RELATIONS,
    SHAPES,
    SIZES,
    Prompt,
    PromptObject,
    Scene,
    ShapeSpec,
    relation_of,
)

_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_NUMBER_WORDS = {2: "two", 3: "three"}


def _group(rng: np.random.Generator, objs: list[ShapeSpec], with_position: bool) -> PromptObject:
    """The noun group a caption states for objects of one (colour, shape): size (if shared) and position drawn."""
    o, n = objs[0], len(objs)
    size = o.size if len({x.size for x in objs}) == 1 and rng.random() < 0.5 else None
    stated = with_position and n == 1 and o.position is not None and rng.random() < POSITION_STATED
    return PromptObject(o.shape, o.color, n, size, o.position if stated else None)


def group_text(o: PromptObject) -> str:
    """A noun group in the caption grammar ("a small red circle on the left", "two blue stars")."""
    words = [w for w in (o.size, o.color) if w is not None] + [o.shape if o.count == 1 else PLURALS[o.shape]]
    words.insert(0, ("an" if words[0][0] in "aeiou" else "a") if o.count == 1 else _NUMBER_WORDS[o.count])
    if o.position is not None:
        words.append(POSITION_PHRASES[o.position])
    return " ".join(words)


def prompt_caption(p: Prompt) -> str:
    """The caption of a Prompt in the module's grammar; parse_caption(prompt_caption(p)) == p."""
    groups = [group_text(o) for o in p.objects]
    if p.relation is not None:
        a, rel, b = p.relation
        text = f"{groups[a]} {RELATION_PHRASES[rel]} {groups[b]}"
    elif len(groups) == 1:
        text = groups[0]
    else:
        text = ", ".join(groups[:-1]) + " and " + groups[-1]
    return text + (f" on a {p.background} background" if p.background is not None else "")


def caption(scene: Scene, rng: np.random.Generator, relation_stated: float = RELATION_STATED) -> str:
    """A random caption, true of the scene, that mentions every object (grammar in the module docstring); a clear
    relation between two objects is stated with probability `relation_stated`."""
    groups: dict[tuple[str, str], list[ShapeSpec]] = {}
    for o in scene.objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    keys = list(groups)
    gs = [groups[keys[j]] for j in rng.permutation(len(keys))]
    rel = None
    if len(gs) == 2 and len(scene.objects) == 2 and rng.random() < relation_stated:
        a, b = gs[0][0], gs[1][0]
        rel = relation_of((a.cx, a.cy), (b.cx, b.cy), strict=True)
    objects = tuple(_group(rng, g, with_position=len(gs) == 1) for g in gs)
    background = scene.background if rng.random() < 0.25 else None
    return prompt_caption(Prompt(objects, None if rel is None else (0, rel, 1), background))


def _match(tokens: list[str], i: int, phrase: str) -> int:
    """Index after `phrase` if tokens[i:] starts with it, else -1."""
    words = phrase.split()
    return i + len(words) if tokens[i:i + len(words)] == words else -1


def _parse_group(tokens: list[str], i: int, text: str) -> tuple[PromptObject, int]:
    if i >= len(tokens) or tokens[i] not in _NUMBERS:
        raise ValueError(f"cannot parse caption {text!r}: expected 'a'/'two'/'three' at word {i + 1}")
    count, i = _NUMBERS[tokens[i]], i + 1
    size = color = position = None
    if i < len(tokens) and tokens[i] in SIZES:
        size, i = tokens[i], i + 1
    if i < len(tokens) and tokens[i] in COLORS:
        color, i = tokens[i], i + 1
    nouns = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
    if i >= len(tokens) or tokens[i] not in nouns:
        raise ValueError(f"cannot parse caption {text!r}: expected a shape {list(SHAPES)} at word {i + 1}")
    shape, i = nouns[tokens[i]], i + 1
    for name, phrase in POSITION_PHRASES.items():
        for p in (phrase, phrase.replace("center", "middle")):
            if _match(tokens, i, p) > 0:
                position, i = name, _match(tokens, i, p)
    return PromptObject(shape, color, count, size, position), i


def parse_caption(text: str) -> Prompt:
    """Structured attributes of a caption written in this module's grammar; raises ValueError naming the bad word."""
    tokens = text.lower().replace(",", " , ").replace(".", " ").split()
    background = None
    for name in sorted(BACKGROUNDS, key=len, reverse=True):
        tail = f"on a {name} background".split()
        if tokens[-len(tail):] == tail:
            background, tokens = name, tokens[:-len(tail)]
            break
    first, i = _parse_group(tokens, 0, text)
    objects, relation = [first], None
    for rel in RELATIONS:
        for phrase in (f"to the {rel}", rel) if rel.endswith(" of") else (rel,):
            j = _match(tokens, i, phrase)
            if j > 0 and relation is None:
                second, i = _parse_group(tokens, j, text)
                objects.append(second)
                relation = (0, rel, 1)
    while relation is None and i < len(tokens) and tokens[i] in (",", "and"):
        nxt, i = _parse_group(tokens, i + 1, text)
        objects.append(nxt)
    if i != len(tokens):
        raise ValueError(f"cannot parse caption {text!r}: unexpected {' '.join(tokens[i:])!r}")
    return Prompt(tuple(objects), relation, background)


def scene_prompt(scene: Scene) -> Prompt:
    """The fullest prompt true of a scene (every group with count, size if shared, position if one object)."""
    groups: dict[tuple[str, str], list[ShapeSpec]] = {}
    for o in scene.objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    objects = tuple(PromptObject(shape, color, len(g), g[0].size if len({x.size for x in g}) == 1 else None,
                                 g[0].position if len(g) == 1 else None) for (color, shape), g in groups.items())
    return Prompt(objects, None, scene.background)
