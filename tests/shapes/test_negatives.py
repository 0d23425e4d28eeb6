"""Hard-negative captions (ldm.shapes.negatives), the caption writer ldm.shapes.captions.prompt_caption and the NegCLIP loss
of ldm.training.clip."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import torch

from ldm.shapes import scenes as S
from ldm.training.clip import ContrastiveStep, negclip_loss
from ldm.training.loop import StepContext
from ldm.shapes.captions import parse_caption, prompt_caption
from ldm.shapes.dataset import dataset_item
from ldm.shapes.detect import check, detect
from ldm.shapes.negatives import NEGATIVE_KINDS, hard_negative, negative_prompt


def _differences(a: S.Prompt, b: S.Prompt) -> int:
    """How many object fields (and the relation) differ between two prompts of the same structure."""
    assert len(a.objects) == len(b.objects) and a.background == b.background
    fields = [f.name for f in dataclasses.fields(S.PromptObject)]
    n = sum(getattr(x, f) != getattr(y, f) for x, y in zip(a.objects, b.objects) for f in fields)
    return n + (a.relation != b.relation)


def test_prompt_caption_inverts_parse_caption_on_the_dataset():
    """Parsing a generated caption and writing it back gives it word for word (2000 train + test captions)."""
    for split in ("train", "test"):
        for i in range(1000):
            _, text, _ = dataset_item(3, split, i)
            assert prompt_caption(parse_caption(text)) == text


def test_negatives_change_one_thing_and_are_false_of_the_image():
    """Each negative differs in one attribute (two for a colour swap); the detector, 100% on clean renders, finds
    the true caption all-correct and every negative not all-correct on the image itself; every kind occurs."""
    kinds: Counter[str] = Counter()
    for i in range(300):
        image, text, _ = dataset_item(4, "train", i)
        dets = detect(image)
        truth = parse_caption(text)
        assert check(truth, dets)["all"], text
        for j in range(3):
            rng = np.random.default_rng([i, j])
            neg = negative_prompt(truth, np.random.default_rng([i, j]))
            assert hard_negative(text, rng) == prompt_caption(neg)  # the same draw
            d = _differences(truth, neg)
            swapped = d == 2 and [o.color for o in neg.objects[:2]] == [o.color for o in truth.objects[1::-1]]
            assert d == 1 or swapped, (text, prompt_caption(neg))
            assert not check(neg, dets)["all"], (text, prompt_caption(neg))
            changed = [f for o, p in zip(truth.objects, neg.objects) for f in ("color", "shape", "position", "count")
                       if getattr(o, f) != getattr(p, f)]
            kinds["swap" if swapped else "relation" if not changed else
                  {"color": "colour"}.get(changed[0], changed[0])] += 1
    assert set(kinds) == set(NEGATIVE_KINDS), kinds


def _clip_loss_reference(image, text, scale):
    import open_clip

    return open_clip.loss.ClipLoss()(image, text, scale)


def test_negclip_loss_closed_form_and_clip_loss():
    g = torch.Generator().manual_seed(0)
    f = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=-1)  # noqa
    image, text, neg, scale = f(5), f(5), f(7), torch.tensor(14.0, dtype=torch.float64)
    # no negatives: open_clip's ClipLoss
    assert torch.allclose(negclip_loss(image, text, neg[:0], scale), _clip_loss_reference(image, text, scale),
                          rtol=0, atol=1e-12)
    # with negatives, by hand: -log softmax of the matching pair over B + M texts, and over B images
    sim_t, sim_n = scale * image @ text.T, scale * image @ neg.T
    i2t = -(sim_t.diagonal() - torch.logsumexp(torch.cat([sim_t, sim_n], 1), 1)).mean()
    t2i = -(sim_t.diagonal() - torch.logsumexp(sim_t, 0)).mean()
    assert torch.allclose(negclip_loss(image, text, neg, scale), (i2t + t2i) / 2, rtol=0, atol=1e-12)
    # an extra negative can only raise the loss
    assert negclip_loss(image, text, neg, scale) > negclip_loss(image, text, neg[:0], scale)


def test_contrastive_step_negatives_are_seeded_per_slot():
    step = ContrastiveStep(torch.nn.Identity(), torch.nn.Identity(), torch.device("cpu"), k=2,
                           negative_caption=hard_negative)
    caps = ["a red circle", "a blue square above a green star", "two white crosses"]
    ctx = lambda s, p=0: StepContext(step=s, micro=0, seed=0, process_index=p, batch_size=3)  # noqa: E731
    a, b = step.negatives(caps, ctx(5)), step.negatives(caps, ctx(5))
    assert a == b and len(a) == 6 and all(n not in caps for n in a)
    assert step.negatives(caps, ctx(6)) != a  # another step draws other negatives
    # slot 0 of process 1 is global slot 3: not slot 0 of process 0
    assert step.negatives(caps[:1], ctx(5, 1)) != a[:2]


def test_contrastive_step_needs_a_negative_function():
    import pytest

    with pytest.raises(ValueError, match="negative_caption"):
        ContrastiveStep(torch.nn.Identity(), torch.nn.Identity(), torch.device("cpu"), k=1)


def test_negative_of_a_given_kind():
    import pytest

    rng = np.random.default_rng(0)
    p = parse_caption("a red circle on the left")
    assert negative_prompt(p, rng, "position").objects[0].position in set(S.POSITIONS) - {"left"}
    assert negative_prompt(p, rng, "shape").objects[0].shape != "circle"
    with pytest.raises(ValueError, match="no relation"):
        negative_prompt(p, rng, "relation")
    with pytest.raises(ValueError, match="unknown negative kind"):
        negative_prompt(p, rng, "texture")
