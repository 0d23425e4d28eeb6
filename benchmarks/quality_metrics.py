"""The measures of benchmarks/quality.py: per-attribute accuracy, Frechet distance and CLIP score in a CLIP's
feature space, the VAE's reconstructions, and probes of what the text conditioning tells apart and what the U-Net
listens to. Pure functions of their inputs (a pipeline, a CLIP, images, captions); the prompts and the run are in
benchmarks/quality.py."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from ldm.shapes import scenes as S
from ldm.shapes.captions import parse_caption, prompt_caption
from ldm.shapes.detect import score_image

ATTRIBUTES = ("shape", "color", "position", "count", "relation", "all")


def summarize(scores: list[dict[str, Any]]) -> dict[str, float]:
    """Per-attribute accuracy: the fraction of images where the attribute is right, among those whose prompt states
    it (NaN when none does); "all" is the fraction with every stated attribute (and the count) right."""
    out = {}
    for key in ATTRIBUTES:
        vals = [s[key] for s in scores if s.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    out["n"] = len(scores)
    return out


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof 1) of features x (N, D), float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (negative rounding clipped to 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """d^2(N(mu1, C1), N(mu2, C2)) = |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) (Dowson & Landau 1982)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, cov {cov1.shape} {cov2.shape}")
    r1 = _sqrt_psd(cov1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ cov2 @ r1), 0, None)).sum()  # tr (C1^1/2 C2 C1^1/2)^1/2
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def fd(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(a.double().numpy()), *feature_stats(b.double().numpy()))


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIPScore = 100 max(cos(image, text), 0) per pair (Hessel et al. 2021, eq. 1 with w = 100), (N,)."""
    cos = torch.nn.functional.cosine_similarity(image_features.double(), text_features.double(), dim=-1)
    return 100 * cos.clamp_min(0)


@torch.no_grad()
def clip_features(clip: Any, images: np.ndarray | None = None, texts: list[str] | None = None) -> torch.Tensor:
    """Projected CLIP features (not normalised) of images (N, H, W, 3) in [0, 1], or of texts (tokenized as the CLIP
    was trained: "!" padding to its own context length)."""
    from ldm.networks.text import OpenCLIPTextEncoder

    if images is not None:
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W) in [-1, 1]
        return torch.cat([clip.encode_image(x[i:i + 256]) for i in range(0, len(x), 256)])
    return clip.encode_text(OpenCLIPTextEncoder(clip).tokenize(texts))


def vae_reconstruction(pipe: Any, images: np.ndarray, captions: list[str]) -> tuple[float, float]:
    """Mean PSNR (peak-to-peak 2 in [-1, 1]) of the VAE's mode reconstructions, and their all-correct rate against
    the images' captions: how well the VAE draws test scenes (not a bound on generated images, scored on others)."""
    from ldm.training.vae import psnr

    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        rec = torch.cat([pipe.vae(x[i:i + 64]) for i in range(0, len(x), 64)]).clamp(-1, 1)
    ims = ((rec + 1) / 2).permute(0, 2, 3, 1).double().numpy()
    return float(psnr(x, rec).mean()), summarize([score_image(c, im) for c, im in zip(captions, ims)])["all"]


@torch.no_grad()
def text_separation(text_encoder: Any) -> dict[str, float]:
    """How far apart the text encoder puts captions that differ in one word: the mean relative distance
    |E(a) - E(b)| / |E(a)| of the whole (n, D) token sequences, over minimal pairs that change the colour, the
    shape, the position or the relation word (the U-Net can only follow what these embeddings tell apart)."""
    colors, shapes, positions = list(S.COLORS), list(S.SHAPES), list(S.POSITION_PHRASES.values())
    pairs: dict[str, list[tuple[str, str]]] = {
        "colour": [(f"a {a} circle", f"a {b} circle") for a, b in itertools.combinations(colors, 2)],
        "shape": [(f"a red {a}", f"a red {b}") for a, b in itertools.combinations(shapes, 2)],
        "position": [(f"a red circle {a}", f"a red circle {b}") for a, b in itertools.combinations(positions, 2)],
        "relation": [(f"a red circle {S.RELATION_PHRASES[a]} a blue square", f"a red circle {S.RELATION_PHRASES[b]} a blue square")
                     for a, b in itertools.combinations(S.RELATIONS, 2)],
    }
    out = {}
    for name, ps in pairs.items():
        a, b = (text_encoder.encode([p[i] for p in ps]).flatten(1).double() for i in (0, 1))
        out[name] = float(((a - b).norm(dim=1) / a.norm(dim=1)).mean())
    return out


SENSITIVITY_BANDS: tuple[tuple[int, int], ...] = ((700, 1000), (300, 700), (0, 300))


@torch.no_grad()
def caption_sensitivity(pipe: Any, images: np.ndarray, captions: list[str], *, seed: int = 0,
                        bands: tuple[tuple[int, int], ...] = SENSITIVITY_BANDS) -> dict[str, dict[str, float]]:
    """Which words the U-Net listens to, per noise band [lo, hi) of timesteps: the mean squared error of its x0
    estimate with a caption changed in one attribute (ldm.shapes.negatives, per kind; "empty" = the caption "")
    over that with the true caption, minus 1, on the same z_t. 0 means the word is ignored; a model that reads the
    word scores > 0 where the word decides the image (e.g. layout at high noise)."""
    from ldm.diffusion.process import q_sample
    from ldm.diffusion.parameterization import to_x0
    from ldm.shapes.negatives import NEGATIVE_KINDS, applicable_kinds, negative_prompt

    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) * 2 - 1
    z0 = pipe.vae.scale_latents(torch.cat([pipe.vae.encode(x[i:i + 64]).mode() for i in range(0, len(x), 64)]))
    alphas = pipe.schedule.alphas_cumprod().float()
    rng = np.random.default_rng(seed)
    prompts = [parse_caption(c) for c in captions]
    variants: dict[str, tuple[list[int], list[str]]] = {"empty": (list(range(len(captions))), [""] * len(captions))}
    for kind in NEGATIVE_KINDS:
        idx = [i for i, p in enumerate(prompts) if kind in applicable_kinds(p)]
        variants[kind] = (idx, [prompt_caption(negative_prompt(prompts[i], rng, kind)) for i in idx])
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {}
    for lo, hi in bands:
        t = torch.randint(lo, hi, (len(z0),), generator=gen)
        ab = alphas[t].view(-1, 1, 1, 1)
        z_t = q_sample(z0, t, alphas, torch.randn(z0.shape, generator=gen))

        def x0_error(idx: list[int], texts: list[str]) -> torch.Tensor:
            c = pipe.text_encoder.encode(texts).to(z_t.dtype)
            pred = pipe.unet(z_t[idx], t[idx], encoder_hidden_states=c)
            x0 = to_x0(pipe.schedule.prediction_type, z_t[idx], pred.float(), ab[idx])
            return ((x0 - z0[idx]) ** 2).flatten(1).mean(1)  # (n,)

        row = out.setdefault(f"t {lo}-{hi - 1}", {})
        for kind, (idx, texts) in variants.items():
            if not idx:
                row[kind] = float("nan")
                continue
            # the true caption on the same sub-batch: identical kernels, so a text-blind U-Net scores exactly 0
            true = x0_error(idx, [captions[i] for i in idx]).mean()
            row[kind] = float(x0_error(idx, texts).mean() / true - 1)
    return out
