"""An analytic detector for `ldm.shapes.scenes` images and a GenEval-style prompt-adherence check (Ghosh et al. 2023).

Pipeline (numpy only, all float64, image values in [0, 1]):
1. smooth with the binomial kernel [1, 2, 1] / 4 (suppresses pixel noise; templates get the same kernel);
2. background = per-channel median of the 2-pixel border;
3. foreground = RGB distance to the background > FG_THRESHOLD; 4-connected components of at least MIN_AREA;
4. colour: the median of the component's most distinct pixels is matched to the palette colour whose mixing line
   background -> colour passes nearest (antialiasing and blur mix object and background linearly in RGB);
5. coverage alpha = projection of (pixel - background) on (colour - background), which blur and zero-mean noise
   leave unbiased in sum and centroid; for each candidate shape its box is fitted from the moments
   (side = sqrt(area / (A fill)), centre = centroid - the shape's centroid offset; amplitude A refitted once) and
   its antialiased template, sharp and blurred (TEMPLATE_BLURS: generated images are often soft), is fitted to
   alpha by least squares; the best-fitting shape wins and gives the side (size) and centre (position).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ldm.shapes import scenes as S
from ldm.shapes.captions import parse_caption

FG_THRESHOLD = 0.2  # RGB distance to the background; every palette colour is >= 0.43 from every background
MIN_AREA = 0.006  # components smaller than this fraction of the image are noise
TEMPLATE_BLURS = (0.0, 1.0, 2.0)  # Gaussian stds (pixels at 64 px) tried for each template; the best fit wins
GROW = 3  # pixels a component's region extends past its thresholded mask (takes in blurred edges)


@dataclass(frozen=True)
class Detection:
    """One detected object: attributes, fitted box (fractions of the image side) and shape-match score."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    side: float
    area: float  # summed coverage alpha, in pixels
    score: float  # 1 - relative squared residual of the best shape template fit


def _smooth(x: np.ndarray) -> np.ndarray:
    """Separable binomial [1, 2, 1] / 4 filter over the first two axes, edges replicated."""
    p = np.pad(x, [(1, 1), (1, 1)] + [(0, 0)] * (x.ndim - 2), mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


@functools.lru_cache(maxsize=256)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix applying a Gaussian of std `sigma` (truncated at 3 sigma, edges replicated) along one axis."""
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    m = np.zeros((n, n))
    for i in range(n):
        np.add.at(m[i], np.clip(np.arange(i - r, i + r + 1), 0, n - 1), k / k.sum())
    return m


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array (std `sigma` pixels)."""
    if sigma <= 0:
        return x
    return _gaussian_matrix(x.shape[0], sigma) @ x @ _gaussian_matrix(x.shape[1], sigma).T


def _shift_max(labels: np.ndarray, diagonal: bool) -> np.ndarray:
    """Max over each pixel's 4- (or 8-) neighbourhood, itself included."""
    p = np.pad(labels, 1)
    h, w = labels.shape
    offs = [(0, 1), (1, 0), (1, 2), (2, 1)] + ([(0, 0), (0, 2), (2, 0), (2, 2)] if diagonal else [])
    out = labels.copy()
    for i, j in offs:
        out = np.maximum(out, p[i:i + h, j:j + w])
    return out


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean mask: labels 1..n (0 = background) and n, by max-label propagation."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        new = np.where(mask, _shift_max(labels, diagonal=False), 0)
        if np.array_equal(new, labels):
            break
        labels = new
    uniq = np.unique(labels[mask])
    remap = np.zeros(labels.max() + 1, dtype=np.int64)
    remap[uniq] = np.arange(1, len(uniq) + 1)
    return remap[labels], len(uniq)


def estimate_background(x: np.ndarray, border: int = 2) -> np.ndarray:
    """Per-channel median of the image border, (3,)."""
    frame = np.concatenate([x[:border].reshape(-1, 3), x[-border:].reshape(-1, 3),
                            x[:, :border].reshape(-1, 3), x[:, -border:].reshape(-1, 3)])
    return np.median(frame, axis=0)


def classify_color(color: np.ndarray, background: np.ndarray) -> str:
    """Palette colour whose mixing line background + t (p - background), t in [0.5, 1.5], passes nearest `color`."""
    best, best_d = "", np.inf
    for name, rgb in S.COLORS.items():
        v = np.asarray(rgb, dtype=np.float64) / 255 - background
        t = np.clip((color - background) @ v / (v @ v), 0.5, 1.5)
        d = np.linalg.norm(color - background - t * v)
        if d < best_d:
            best, best_d = name, d
    return best


def _fit_shape(alpha: np.ndarray, region: np.ndarray, size: int) -> tuple[str, float, float, float, float, float]:
    """Best shape by least squares alpha ~ A * blur(template) over shapes and blurs: (shape, cx, cy, side, area, score).

    The template's box comes from the moments (side = sqrt(area / (A * fill)), centre = centroid - offset * side);
    the amplitude A (< 1 when blur keeps the object's core from full colour) is refitted once. score = 1 - residual.
    """
    rows, cols = np.nonzero(region)
    pad = 2 + int(np.ceil(3 * max(TEMPLATE_BLURS) * size / 64))
    y0, x0 = max(rows.min() - pad, 0), max(cols.min() - pad, 0)
    y1, x1 = min(rows.max() + 1 + pad, size), min(cols.max() + 1 + pad, size)
    a = np.where(region, alpha, 0.0)[y0:y1, x0:x1]  # the work happens in this window
    area = a.sum()
    ys, xs = np.indices(a.shape, dtype=np.float64)
    gx, gy = (a * (xs + x0 + 0.5)).sum() / area / size, (a * (ys + y0 + 0.5)).sum() / area / size
    norm = (a * a).sum()
    best = ("", 0.0, 0.0, 0.0, -np.inf)
    for shape in S.SHAPES:
        amp, fitted = 1.0, None
        for _ in range(2):
            side = float(np.sqrt(max(area, 1.0) / (amp * S.FILL[shape]))) / size
            cx, cy = gx - S.CENTROID[shape][0] * side, gy - S.CENTROID[shape][1] * side
            t0 = _smooth(S.render_mask(shape, cx, cy, side, size, window=(x0, y0, x1, y1)))
            fits = []
            for blur in TEMPLATE_BLURS:
                t = _gaussian(t0, blur * size / 64)
                energy = (t * t).sum()
                if energy == 0:  # the template lies outside the window (a speck of a region): no fit
                    continue
                amp_b = float((a * t).sum() / energy)
                fits.append((1 - ((a - amp_b * t) ** 2).sum() / norm, amp_b))
            if not fits:
                break
            score, amp = max(fits)
            fitted = (shape, cx, cy, side, score)
            if amp <= 0:  # the template missed the region's mass (or fit its negative part): no side to refit from
                break
        if fitted is not None and fitted[4] > best[4]:
            best = fitted
    shape, cx, cy, side, score = best
    return shape, cx, cy, side, float(area), float(score)


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects in a square RGB image (PIL, an (H, W, 3) uint8 array, or a float array in [0, 1]), sorted by area,
    largest first."""
    x = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] != x.shape[1]:
        raise ValueError(f"detect expects a square RGB image (H, W, 3), got shape {x.shape}")
    x = x / 255.0 if x.dtype == np.uint8 else np.asarray(x, dtype=np.float64)
    if not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise ValueError(f"detect expects float pixel values in [0, 1] (or a uint8 image), got values in "
                         f"[{x.min():.3g}, {x.max():.3g}]")
    size = x.shape[0]
    x = _smooth(x)
    bg = estimate_background(x)
    dist = np.linalg.norm(x - bg, axis=-1)
    labels, n = connected_components(dist > FG_THRESHOLD)
    grown = labels
    for _ in range(GROW):
        grown = np.where(grown == 0, _shift_max(grown, diagonal=True), grown)
    out = []
    for k in range(1, n + 1):
        comp = labels == k
        if comp.sum() < MIN_AREA * size * size:
            continue
        d = dist[comp]
        core = x[comp][d >= np.quantile(d, 0.7)]
        color = np.median(core, axis=0)
        v = color - bg
        alpha = (x - bg) @ v / (v @ v)
        shape, cx, cy, side, area, score = _fit_shape(alpha, grown == k, size)
        out.append(Detection(shape, classify_color(color, bg), "large" if side >= S.SIZE_THRESHOLD else "small",
                             S.position_of(cx, cy), cx, cy, side, area, score))
    return sorted(out, key=lambda o: -o.area)


def _attribute_hits(p: S.PromptObject, d: Detection | None) -> dict[str, bool]:
    """Which stated attributes of one prompt object a detection satisfies (none when there is no detection)."""
    stated = {"shape": p.shape, "color": p.color, "size": p.size, "position": p.position}
    return {k: d is not None and getattr(d, k) == v for k, v in stated.items() if v is not None}


def check(prompt: S.Prompt | str, detections: list[Detection], max_detections: int = 8) -> dict[str, Any]:
    """GenEval-style per-attribute correctness of detections against a prompt (a Prompt or a caption).

    The prompt's groups are expanded to single objects and assigned to distinct detections (at most
    `max_detections`, largest first), choosing the assignment that matches the most shapes, then among those the
    most colours, sizes, positions, then the relation. Under it: shape / color / size / position are True when every
    object stating that attribute got a detection satisfying it (None when no object states it); relation is True
    when the assigned detections stand in the stated relation (`shapes.relation_of`, non-strict; None without one);
    count is True when the number of detections equals the number of objects the prompt names; all = every non-None.
    """
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    objs = [(g, p) for g, p in enumerate(prompt.objects) for _ in range(p.count)]
    dets = list(detections)[:max_detections]
    slots: list[Detection | None] = dets + [None] * max(0, len(objs) - len(dets))

    keys = ("shape", "color", "size", "position")

    def evaluate(assign: tuple[Detection | None, ...]) -> tuple[tuple[int, ...], dict[str, bool | None]]:
        res: dict[str, bool | None] = dict.fromkeys(keys)
        n_hits = dict.fromkeys(keys, 0)
        for (_, p), d in zip(objs, assign):
            for key, ok in _attribute_hits(p, d).items():
                res[key] = (res[key] is not False) and ok
                n_hits[key] += ok
        res["relation"] = None
        if prompt.relation is not None:
            i, rel, j = prompt.relation
            first = {g: d for (g, _), d in reversed(list(zip(objs, assign)))}
            a, b = first[i], first[j]
            res["relation"] = a is not None and b is not None and S.relation_of((a.cx, a.cy), (b.cx, b.cy)) == rel
        return (*(n_hits[k] for k in keys), int(res["relation"] is True)), res

    best = max((evaluate(a) for a in itertools.permutations(slots, len(objs))), key=lambda sr: sr[0])[1]
    best["count"] = len(detections) == len(objs)
    best["all"] = all(v is not False for v in best.values())
    return best


def score_image(caption: str, image: Image.Image | np.ndarray) -> dict[str, Any]:
    """check(parse_caption(caption), detect(image)): the per-attribute correctness of one generated image."""
    return check(parse_caption(caption), detect(image))


OPPOSITE: dict[str, str] = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def relation_outcome(prompt: S.Prompt | str, detections: list[Detection]) -> str | None:
    """How an image drew a prompt's relation: "right"; "swapped" (on the stated axis, the wrong way round, e.g. A below
    B for "A above B"); "orthogonal" (side by side for above, stacked for left of); "missing" (an object's colour is
    not detected). None for a prompt without a relation. Each object is the largest detection of its colour and
    shape, else of its colour (so a wrong shape still places the object); relation as in check (non-strict)."""
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    if prompt.relation is None:
        return None
    i, rel, j = prompt.relation
    found = []
    for o in (prompt.objects[i], prompt.objects[j]):
        same = [d for d in detections if d.color == o.color and d.shape == o.shape]
        found.append((same or [d for d in detections if d.color == o.color] or [None])[0])
    a, b = found
    if a is None or b is None or a is b:
        return "missing"
    drawn = S.relation_of((a.cx, a.cy), (b.cx, b.cy))
    return "right" if drawn == rel else "swapped" if drawn == OPPOSITE[rel] else "orthogonal"
