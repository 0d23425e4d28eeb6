"""A deterministic synthetic captioned-shapes dataset: scenes, antialiased renders, splits.

A scene is 1-3 non-overlapping flat shapes on a plain muted background. Coordinates are fractions of the image side,
y pointing down; every shape fills a square bounding box of side `side` centred on (cx, cy).

Held-out split: the (colour, shape) pairs in HELD_OUT_PAIRS never occur in split "train"; every scene of split "test"
contains at least one of them (compositional generalisation). `is_held_out(scene)` tells whether a scene has one.

Captions and their parser are ldm.shapes.captions; the exported dataset is ldm.shapes.dataset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS: dict[str, str] = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 225, 40), "green": (40, 175, 50),
    "cyan": (40, 210, 225), "blue": (40, 70, 220), "purple": (160, 50, 210), "white": (245, 245, 245),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"gray": (128, 128, 128), "dark gray": (72, 72, 72),
                                                "taupe": (120, 105, 90)}
SIZES: dict[str, tuple[float, float]] = {"small": (0.24, 0.30), "large": (0.40, 0.48)}  # side, fraction of image
SIZE_THRESHOLD = 0.35  # sides below are "small", above "large"
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_PHRASES: dict[str, str] = {"left": "on the left", "right": "on the right", "top": "at the top",
                                    "bottom": "at the bottom", "center": "in the center"}
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
RELATION_PHRASES: dict[str, str] = {"above": "above", "below": "below", "left of": "to the left of",
                                    "right of": "to the right of"}
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("green", "circle"), ("yellow", "square"), ("blue", "triangle"),
    ("orange", "star"), ("purple", "cross"), ("white", "diamond"),
})
SPLITS: dict[str, int] = {"train": 0, "test": 1}
# Layout weights and how often a lone object's position is stated: position and relation captions are frequent
# (about 40% and 30% of captions) because they are the slowest words for the U-Net to learn (docs/default-model.md).
LAYOUTS: dict[str, float] = {"single": 0.45, "relation": 0.35, "pair": 0.05, "count": 0.10, "triple": 0.05}
POSITION_STATED = 0.9
RELATION_STATED = 0.85  # how often a two-object caption states the objects' relation (else "A and B")
MARGIN = 0.04  # min distance from a shape's box to the image border
GAP = 0.07  # min gap between two shapes' boxes (about 4.5 px at 64 px)


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    pts = [(r * math.sin(math.pi * k / points), -r * math.cos(math.pi * k / points))
           for k in range(2 * points) for r in [1.0 if k % 2 == 0 else inner]]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy, w, h = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
    return [((x - cx) / w, (y - cy) / h) for x, y in pts]


_A = 1 / 6  # half the arm width of the cross
UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {  # in the unit box [-0.5, 0.5]^2, y down
    "square": [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "diamond": [(0, -0.5), (0.5, 0), (0, 0.5), (-0.5, 0)],
    "triangle": [(0, -0.5), (0.5, 0.5), (-0.5, 0.5)],
    "cross": [(-_A, -0.5), (_A, -0.5), (_A, -_A), (0.5, -_A), (0.5, _A), (_A, _A), (_A, 0.5), (-_A, 0.5),
              (-_A, _A), (-0.5, _A), (-0.5, -_A), (-_A, -_A)],
    "star": _star(),
}


def polygon_area_centroid(points: list[tuple[float, float]]) -> tuple[float, float, float]:
    """Area and centroid (x, y) of a simple polygon by the shoelace formula."""
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]):
        c = x0 * y1 - x1 * y0
        a, cx, cy = a + c, cx + (x0 + x1) * c, cy + (y0 + y1) * c
    return abs(a) / 2, cx / (3 * a), cy / (3 * a)


# Fraction of its bounding box each shape fills, and its centroid's offset from the box centre (unit box).
FILL: dict[str, float] = {"circle": math.pi / 4, **{s: polygon_area_centroid(p)[0] for s, p in UNIT_POLYGONS.items()}}
CENTROID: dict[str, tuple[float, float]] = {"circle": (0.0, 0.0),
                                            **{s: polygon_area_centroid(p)[1:] for s, p in UNIT_POLYGONS.items()}}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: its attributes and its box (centre and side as fractions of the image side)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: float

    def __post_init__(self) -> None:
        for value, valid, name in ((self.shape, SHAPES, "shape"), (self.color, COLORS, "color"),
                                   (self.size, SIZES, "size")):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {list(valid)}")

    @property
    def position(self) -> str | None:
        """The unambiguous position label of the centre, or None (see `position_of`)."""
        return position_of(self.cx, self.cy, strict=True)


@dataclass(frozen=True)
class Scene:
    """Shapes on a plain background."""

    objects: tuple[ShapeSpec, ...]
    background: str = "gray"

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; valid: {list(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, got {len(self.objects)}")

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background,
                "objects": [{**dataclasses.asdict(o), "position": o.position} for o in self.objects]}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Scene:
        fields = {f.name for f in dataclasses.fields(ShapeSpec)}
        return Scene(tuple(ShapeSpec(**{k: v for k, v in o.items() if k in fields}) for o in d["objects"]),
                     d["background"])


@dataclass(frozen=True)
class PromptObject:
    """A noun group of a caption: `count` shapes, with the attributes the caption states (None = not stated)."""

    shape: str
    color: str | None = None
    count: int = 1
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Prompt:
    """Structured attributes of a caption; `relation` is (subject index, relation, object index) into `objects`."""

    objects: tuple[PromptObject, ...]
    relation: tuple[int, str, int] | None = None
    background: str | None = None

    def to_dict(self) -> dict[str, Any]:
        rel = self.relation
        return {"objects": [dataclasses.asdict(o) for o in self.objects], "background": self.background,
                "relation": None if rel is None else {"subject": rel[0], "relation": rel[1], "object": rel[2]}}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Prompt:
        """Inverse of `to_dict` (e.g. the "prompt" column of an exported dataset)."""
        rel = d.get("relation")
        return Prompt(tuple(PromptObject(**o) for o in d["objects"]),
                      None if rel is None else (rel["subject"], rel["relation"], rel["object"]), d.get("background"))


def position_of(cx: float, cy: float, strict: bool = False) -> str | None:
    """Position label of a centre: "center" near the middle, else the dominant direction. Strict: None if ambiguous."""
    u, v = cx - 0.5, cy - 0.5
    m = max(abs(u), abs(v))
    if m <= (0.08 if strict else 0.11):
        return "center"
    if strict and (m < 0.14 or abs(abs(u) - abs(v)) < 0.06):
        return None
    if abs(u) > abs(v):
        return "left" if u < 0 else "right"
    return "top" if v < 0 else "bottom"


def relation_of(a: tuple[float, float], b: tuple[float, float], strict: bool = False) -> str | None:
    """Where centre a lies relative to centre b along the dominant axis. Strict: None unless clearly dominant."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if strict and abs(abs(dx) - abs(dy)) < 0.1:
        return None
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, scale: float, fill: Any) -> None:
    x, y, s = cx * scale, cy * scale, side * scale
    if shape == "circle":
        draw.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=fill)
    else:
        draw.polygon([(x + px * s, y + py * s) for px, py in UNIT_POLYGONS[shape]], fill=fill)


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """RGB render of a scene: drawn at `supersample` x the size, then box-filtered down (antialiasing)."""
    big = Image.new("RGB", (size * supersample,) * 2, BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw(draw, o.shape, o.cx, o.cy, o.side, size * supersample, COLORS[o.color])
    return big.reduce(supersample)


def render_mask(shape: str, cx: float, cy: float, side: float, size: int = 64, supersample: int = 4,
                window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Coverage in [0, 1] of one shape on a `size` x `size` grid (float64), antialiased like `render`.

    `window` = (x0, y0, x1, y1) in pixels renders only that crop of the grid (the same values up to
    the rasteriser's rounding, less work).
    """
    x0, y0, x1, y1 = window or (0, 0, size, size)
    big = Image.new("L", ((x1 - x0) * supersample, (y1 - y0) * supersample), 0)
    k = size * supersample
    _draw(ImageDraw.Draw(big), shape, cx - x0 / size, cy - y0 / size, side, k, 255)
    return np.asarray(big.reduce(supersample), dtype=np.float64) / 255.0


def is_held_out(scene: Scene) -> bool:
    """True if any object of the scene has a (colour, shape) pair held out of the training split."""
    return any((o.color, o.shape) in HELD_OUT_PAIRS for o in scene.objects)


def _pairs(rng: np.random.Generator, n: int, split: str, same: bool) -> list[tuple[str, str]]:
    """n (colour, shape) pairs: all equal if `same`, else distinct; none held out (train) or >= 1 held out (test)."""
    colors, shapes, held = list(COLORS), list(SHAPES), sorted(HELD_OUT_PAIRS)
    while True:
        pairs = [(colors[rng.integers(len(colors))], shapes[rng.integers(len(shapes))]) for _ in range(n)]
        if split == "test":
            pairs[rng.integers(n)] = held[rng.integers(len(held))]
        if same:
            pairs = [pairs[0]] * n
        if not same and len(set(pairs)) < n:
            continue
        if (split == "train") == (not any(p in HELD_OUT_PAIRS for p in pairs)):
            return pairs


def _place(rng: np.random.Generator, sides: list[float], ok: Any, tries: int = 400) -> list[tuple[float, float]] | None:
    """Rejection-sample non-overlapping centres inside the image for boxes of `sides` that satisfy `ok(centres)`."""
    for _ in range(tries):
        cs = [(rng.uniform(s / 2 + MARGIN, 1 - s / 2 - MARGIN), rng.uniform(s / 2 + MARGIN, 1 - s / 2 - MARGIN))
              for s in sides]
        apart = all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) - (sa + sb) / 2 >= GAP
                    for i, (a, sa) in enumerate(zip(cs, sides)) for b, sb in zip(cs[i + 1:], sides[i + 1:]))
        if apart and ok(cs):
            return cs
    return None


def check_layouts(layouts: dict[str, float]) -> dict[str, float]:
    """Layout weights (a mix of LAYOUTS' names, >= 0, not all 0), else a ValueError naming the problem."""
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown layout(s) {unknown}; valid: {list(LAYOUTS)}")
    if not all(0 <= w < math.inf for w in layouts.values()) or sum(layouts.values()) <= 0:
        raise ValueError(f"layout weights must be finite, >= 0 and not all 0, got {layouts}")
    return layouts


def check_relation_stated(relation_stated: float) -> float:
    """A probability that a two-object caption states the relation, else a ValueError."""
    if not 0.0 <= relation_stated <= 1.0:
        raise ValueError(f"relation_stated must lie in [0, 1], got {relation_stated}")
    return relation_stated


def sample_scene(rng: np.random.Generator, split: str = "train", layout: str | None = None,
                 layouts: dict[str, float] | None = None) -> Scene:
    """A random scene of the split; layout is one of LAYOUTS, drawn by `layouts`' weights (LAYOUTS') when None."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    if layout is None:
        weights = LAYOUTS if layouts is None else check_layouts(layouts)
        names = list(weights)
        layout = names[rng.choice(len(names), p=np.array(list(weights.values())) / sum(weights.values()))]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {list(LAYOUTS)}")
    n = {"single": 1, "relation": 2, "pair": 2, "triple": 3}.get(layout) or int(rng.integers(2, 4))
    pairs = _pairs(rng, n, split, same=layout == "count")
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    ok: Any = lambda cs: True  # noqa: E731
    if layout == "single":
        where = POSITIONS[rng.integers(len(POSITIONS))]
        ok = lambda cs: position_of(*cs[0], strict=True) == where  # noqa: E731
    elif layout == "relation":
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        ok = lambda cs: relation_of(cs[0], cs[1], strict=True) == rel  # noqa: E731
    while True:
        sizes = [list(SIZES)[rng.integers(len(SIZES))] for _ in range(n)]
        sides = [rng.uniform(*SIZES[s]) for s in sizes]
        centres = _place(rng, sides, ok)
        if centres is not None:
            objects = tuple(ShapeSpec(shape, color, sz, float(c[0]), float(c[1]), float(s))
                            for (color, shape), sz, s, c in zip(pairs, sizes, sides, centres))
            return Scene(objects, background)
