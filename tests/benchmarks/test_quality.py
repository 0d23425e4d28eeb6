"""benchmarks/quality.py and quality_metrics.py: the metrics on inputs with known answers (closed forms, scipy,
invariants) and the prompts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.shapes import scenes as S
from ldm.shapes.captions import parse_caption

_spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parents[2] / "benchmarks" / "quality.py")
Q = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(Q)  # puts the repository root on sys.path, as running the script does

from benchmarks import quality_metrics as M  # noqa: E402


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_frechet_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).standard_normal((200, 16))
    mu, cov = M.feature_stats(x)
    assert abs(M.frechet_distance(mu, cov, mu, cov)) < 1e-9


def test_frechet_diagonal_closed_form():
    """Commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, exactly."""
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_frechet_matches_scipy_sqrtm_on_non_commuting_covariances():
    """The usual FID formula tr(C1 + C2 - 2 sqrtm(C1 C2)) with scipy, to 1e-8 relative."""
    from scipy import linalg

    rng = np.random.default_rng(2)
    for d in (2, 5, 16):
        c1, c2, mu1, mu2 = _spd(rng, d), _spd(rng, d), rng.standard_normal(d), rng.standard_normal(d)
        ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
        assert M.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-8)


def test_frechet_is_symmetric_and_rotation_invariant():
    rng = np.random.default_rng(3)
    c1, c2, mu1, mu2 = _spd(rng, 6), _spd(rng, 6), rng.standard_normal(6), rng.standard_normal(6)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    d = M.frechet_distance(mu1, c1, mu2, c2)
    assert M.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(d, rel=1e-10)
    assert M.frechet_distance(q @ mu1, q @ c1 @ q.T, q @ mu2, q @ c2 @ q.T) == pytest.approx(d, rel=1e-10)


def test_frechet_of_samples_converges_to_the_gaussians_distance():
    """Two 2-D Gaussians, N = 20000 samples each: the plug-in estimate is within 0.05 of the exact distance
    (the estimator's std at this N is about 0.01)."""
    rng = np.random.default_rng(4)
    c1, c2 = np.array([[1.0, 0.5], [0.5, 2.0]]), np.array([[0.5, -0.2], [-0.2, 1.0]])
    mu1, mu2 = np.zeros(2), np.array([1.0, -0.5])
    x, y = rng.multivariate_normal(mu1, c1, 20000), rng.multivariate_normal(mu2, c2, 20000)
    exact = M.frechet_distance(mu1, c1, mu2, c2)
    assert M.fd(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(exact, abs=0.05)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        M.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        M.feature_stats(np.zeros((1, 4)))


def test_clip_score_known_angles():
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    i = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    got = M.clip_score(i, t)
    want = torch.tensor([100.0, 0.0, 0.0, 100 / np.sqrt(2)], dtype=torch.float64)  # cos 0, 90, 180 (clamped), 45 deg
    assert torch.allclose(got, want, atol=1e-10)


def test_summarize_counts_only_stated_attributes():
    scores = [{"shape": True, "color": False, "position": None, "count": True, "relation": None, "all": False},
              {"shape": True, "color": True, "position": True, "count": True, "relation": None, "all": True},
              {"shape": False, "color": True, "position": False, "count": False, "relation": True, "all": False}]
    s = M.summarize(scores)
    assert s["shape"] == pytest.approx(2 / 3) and s["color"] == pytest.approx(2 / 3)
    assert s["position"] == pytest.approx(1 / 2) and s["relation"] == 1.0 and s["all"] == pytest.approx(1 / 3)
    assert M.summarize([{"shape": True, "all": True}])["relation"] != M.summarize([{"shape": True, "all": True}])["relation"]


@pytest.mark.parametrize("held_out", [False, True])
def test_prompt_sets_parse_and_respect_the_split(held_out):
    singles, pairs = Q.single_prompts(20, held_out), Q.pair_prompts(20, held_out)
    assert len(singles) == len(pairs) == 20
    for text in singles + pairs:
        p = parse_caption(text)
        held = [(o.color, o.shape) in S.HELD_OUT_PAIRS for o in p.objects]
        assert any(held) == held_out, text
    for text in pairs:
        p = parse_caption(text)
        assert len(p.objects) == 2 and p.relation is not None, text
        assert p.objects[0].color != p.objects[1].color and p.objects[0].shape != p.objects[1].shape
    assert len(set(Q.single_prompts(42, False))) == 42  # every seen pair once before repeats


def test_scoring_clean_test_renders_is_all_correct():
    """The benchmark's test images, scored against their own captions, are all correct (the detector's 100%)."""
    images, captions = Q.test_images(12, "test", 0)
    assert images.shape == (12, 64, 64, 3) and 0 <= images.min() and images.max() <= 1
    assert M.summarize([Q.score_image(c, im) for c, im in zip(captions, images)])["all"] == 1.0


@pytest.mark.parametrize("n", [77, 16])
def test_clip_text_features_pad_to_the_clip_context(n):
    """clip_features(texts) tokenizes as the CLIP was trained (padding "!" to its context length, 77 or shorter):
    the same features as open_clip's text tower on those ids; eos is at the end of the caption, not clipped."""
    from ldm.training.clip import build_clip
    from ldm.networks.tokenizer import build_clip_tokenizer

    clip = build_clip({"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                       "head_width": 16},
                       "text_cfg": {"context_length": n, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}},
                      seed=0).eval()
    texts = ["a red circle", "a blue square to the left of a yellow star"]
    ids = build_clip_tokenizer(pad_token="!", model_max_length=n)(texts, padding="max_length", max_length=n,
                                                                   return_tensors="pt").input_ids
    assert ids.shape == (2, n) and (ids.argmax(-1) == torch.tensor([4, 11])).all()  # eos = 49407, the largest id
    with torch.no_grad():
        assert torch.equal(M.clip_features(clip, texts=texts), clip.encode_text(ids))


def test_text_separation_sees_only_the_words_the_encoder_distinguishes():
    """An encoder that reads only the colour word: colour pairs are apart by the closed form, the rest at 0."""

    class ColourOnly:
        def encode(self, prompts):
            out = torch.ones(len(prompts), 77, 2, dtype=torch.float64)
            for i, p in enumerate(prompts):
                if "red" not in p.split():  # "a blue circle" etc.: the first token's feature moves by 1
                    out[i, 0, 0] += 1.0
            return out

    sep = M.text_separation(ColourOnly())
    assert sep["shape"] == sep["position"] == sep["relation"] == 0.0
    # colour pairs (a, b) over the 8 colours: 7 of the 28 include red; |E(a) - E(b)| = 1 when exactly one is red
    expected = 7 * (1 / np.sqrt(154.0)) / 28  # red comes first in its pairs (dict order): |E(red)| = sqrt(77 * 2)
    assert sep["colour"] == pytest.approx(expected, rel=1e-12)


def test_caption_sensitivity_is_zero_for_a_unet_that_ignores_text_and_not_otherwise():
    """A U-Net that ignores the caption scores exactly 0 for every kind and band; the tiny text-conditioned U-Net
    does not (the empty caption changes its x0 estimate); every kind the test captions admit is measured."""
    from types import SimpleNamespace

    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)

    class Deaf(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, x, t, encoder_hidden_states):
            return self.unet(x, t, encoder_hidden_states=torch.zeros_like(encoder_hidden_states))

    images, captions = Q.test_images(24, "train", 1)
    images = images[:, ::2, ::2]  # 32 x 32: the tiny VAE's sample size
    with torch.no_grad():
        deaf = M.caption_sensitivity(SimpleNamespace(vae=c.vae, unet=Deaf(c.unet), text_encoder=c.text_encoder,
                                                     schedule=c.schedule), images, captions)
        real = M.caption_sensitivity(SimpleNamespace(vae=c.vae, unet=c.unet, text_encoder=c.text_encoder,
                                                     schedule=c.schedule), images, captions)
    assert list(deaf) == [f"t {lo}-{hi - 1}" for lo, hi in M.SENSITIVITY_BANDS]
    for band in deaf.values():
        assert {"empty", "colour", "shape"} <= set(band)
        assert all(v == 0.0 for v in band.values() if v == v), band
    assert all(abs(band["empty"]) > 1e-6 for band in real.values()), real


def test_relation_breakdown_counts_outcomes_per_word_and_refuses_prompts_without_one():
    from benchmarks.relations import relation_breakdown

    scene = S.Scene((S.ShapeSpec("circle", "red", "small", 0.5, 0.25, 0.28),
                     S.ShapeSpec("square", "blue", "small", 0.5, 0.75, 0.28)), "gray")
    image = np.asarray(S.render(scene), dtype=np.float64) / 255  # a red circle above a blue square, whatever asked
    prompts = ["a red circle above a blue square", "a blue square above a red circle",
               "a red circle to the left of a blue square", "a blue square below a red circle"]
    calls = []
    out = relation_breakdown(lambda ps, seed: calls.append(seed) or np.stack([image] * len(ps)), prompts, 2)
    assert calls == [0, 1000]
    assert out["above"] == {"right": 0.5, "swapped": 0.5, "orthogonal": 0.0, "missing": 0.0, "n": 4}
    assert out["left of"]["orthogonal"] == 1.0 and out["below"]["right"] == 1.0 and out["right of"]["n"] == 0
    assert out["all"]["n"] == 8 and out["all"]["right"] == 0.5
    with pytest.raises(ValueError, match="needs relation prompts"):
        relation_breakdown(lambda ps, seed: np.stack([image] * len(ps)), ["a red circle"], 1)


def test_checkpoint_adherence_scores_the_exported_checkpoint(shapes, tmp_path):
    """benchmarks/research/checkpoint_adherence.py gives what exporting the checkpoint's EMA weights by hand and scoring its
    images gives (same prompts, seeds, sampler), for every prompt set and scale."""
    from benchmarks.research.checkpoint_adherence import checkpoint_adherence
    from ldm.training.unet import train
    from ldm.training.export import export
    from pipelines.text_to_image import Pipeline
    from tests._helpers import STEPS, tiny_config

    train(tiny_config(shapes, tmp_path / "run"))
    gen = dict(sampler="euler", steps=2)
    res = checkpoint_adherence(tmp_path / "run", [1.0, 3.0], n_single=2, n_pair=2, **gen)
    assert res["step"] == STEPS and res["ema"] and list(res["scales"]) == ["1.0", "3.0"]
    pipe = Pipeline.from_pretrained(export(tmp_path / "run", tmp_path / "by-hand", use_ema=True), dtype=torch.float32)
    sets = Q.prompt_sets(2, 2)
    for s in (1.0, 3.0):
        for name, prompts in sets.items():
            images = Q.generate(pipe, prompts, guidance=s, **gen)
            expected = M.summarize([Q.score_image(p, im) for p, im in zip(prompts, images)])
            got = res["scales"][str(s)][name]
            assert got["n"] == len(prompts) and got.keys() == expected.keys()
            assert all(got[k] == expected[k] or (got[k] != got[k] and expected[k] != expected[k]) for k in got)
