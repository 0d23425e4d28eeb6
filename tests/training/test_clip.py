"""The CLIP stage (ldm.training.clip): its text tower converts exactly to transformers' CLIPTextModel at any context
length, round-trips through a diffusers folder, and a CLIP folder without a text tower round-trips too."""

from __future__ import annotations

import pytest
import torch

from ldm.networks.text import OpenCLIPTextEncoder
from ldm.training.clip import build_clip, clip_text_encoder, load_clip, save_clip
from tests._helpers import TINY_CLIP

PROMPTS = ["a red circle", "a blue square to the left of a yellow star", ""]


def with_context(config: dict, n: int) -> dict:
    return {**config, "text_cfg": {**config["text_cfg"], "context_length": n}}


@pytest.mark.parametrize("n", [77, 16])
def test_clip_text_tower_converts_exactly_to_a_clip_text_model(n):
    """Per-token states of the open_clip tower (OpenCLIPTextEncoder) == the converted CLIPTextModel's, to 1e-5, at
    CLIP's 77 tokens and at a shorter context (text_cfg.context_length: the tokenizer pads to it)."""
    config = with_context(TINY_CLIP, n)
    clip = build_clip(config, seed=3).eval()
    with torch.no_grad():
        for p in clip.parameters():  # non-trivial LayerNorm gains/biases too
            p.add_(0.02 * torch.randn_like(p))
        ref = OpenCLIPTextEncoder(clip).encode(PROMPTS)
        got = clip_text_encoder(clip, config).encode(PROMPTS)
    assert got.shape == ref.shape == (3, n, 32)
    assert (got - ref).abs().max() < 1e-5


def test_short_context_text_encoder_round_trips_through_a_diffusers_folder(tmp_path):
    """A 16-token text tower saved as text_encoder/ + tokenizer/ reloads (ours and transformers') with 16 positions
    and the same states; the tokenizer pads to 16 and warns naming what a longer prompt loses."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.networks.text import TextEncoder

    config = with_context(TINY_CLIP, 16)
    enc = clip_text_encoder(build_clip(config, seed=5).eval(), config)
    enc.save_pretrained(tmp_path)
    back = TextEncoder.from_pretrained(tmp_path)
    assert back.tokenizer.model_max_length == 16 and back.model.config.max_position_embeddings == 16
    with torch.no_grad():
        assert torch.equal(back.encode(PROMPTS), enc.encode(PROMPTS))
        theirs = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
        ids = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")(
            PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        assert ids.shape == (3, 16)
        assert torch.allclose(theirs(ids).last_hidden_state, enc.model(ids).last_hidden_state, atol=1e-6)
    with pytest.warns(UserWarning, match="CLIP takes 16"):
        enc.tokenize("a red circle above a blue square to the left of a large yellow star on a gray background")


def test_clip_config_checks_context_length():
    from ldm.training.clip import ClipTrainConfig, ContrastiveStep
    from ldm.training.data import DataConfig

    data = DataConfig(source="imagefolder", path="x")
    with pytest.raises(ValueError, match="context_length must lie in"):
        ClipTrainConfig(data=data, model=with_context(TINY_CLIP, 2))
    with pytest.raises(ValueError, match="context_length must lie in"):
        ClipTrainConfig(data=data, model=with_context(TINY_CLIP, 78))
    step = ContrastiveStep(torch.nn.Identity(), torch.nn.Identity(), torch.device("cpu"), max_length=16)
    ids = step._ids(PROMPTS)
    assert ids.shape == (3, 16) and ids[0, 0] == 49406 and (ids[2, :2] == torch.tensor([49406, 49407])).all()


def test_clip_folder_without_text_tower_round_trips(tmp_path):
    """save_clip(text=False) + the pipeline's text_encoder/ rebuild the same CLIP: equal image and text features."""
    from ldm.loading.components import save_pipeline
    from pipelines.tiny import tiny_components

    clip = build_clip(TINY_CLIP, seed=4).eval()
    c = tiny_components(seed=0)
    save_pipeline(tmp_path / "p", unet=c.unet, vae=c.vae, text_encoder=clip_text_encoder(clip, TINY_CLIP),
                  schedule=c.schedule)
    save_clip(clip, TINY_CLIP, tmp_path / "p" / "clip", text=False)
    back = load_clip(tmp_path / "p" / "clip", text_encoder_folder=tmp_path / "p")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.randint(1, 49406, (2, 77))
    with torch.no_grad():
        assert torch.equal(back.encode_image(x), clip.encode_image(x))
        assert torch.allclose(back.encode_text(ids), clip.encode_text(ids), atol=1e-6)
    with pytest.raises(KeyError, match="missing CLIP key"):
        load_clip(tmp_path / "p" / "clip")  # the text tower is not in clip/ alone
