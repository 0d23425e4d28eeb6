"""Our CLIP text transformer (ldm.networks.clip_text) against transformers' CLIPTextModel(WithProjection): the same
state-dict keys, bit-identical outputs on the same weights, and a folder (ours or transformers') loads into it."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from ldm.io import WeightsError
from ldm.networks import clip_text
from ldm.networks.text import TextEncoder
from ldm.networks.tokenizer import build_clip_tokenizer

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, projection_dim=16)


def _pair(act: str, projection: bool, seed: int = 0):
    """transformers' model (seeded) and ours holding its weights."""
    config = transformers.CLIPTextConfig(hidden_act=act, **SMALL)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        theirs = (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)
    ours_config = clip_text.CLIPTextConfig.from_dict(config.to_dict())
    ours = (clip_text.CLIPTextModelWithProjection if projection else clip_text.CLIPTextModel)(ours_config)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def _ids() -> torch.Tensor:
    ids = torch.randint(0, 49406, (3, 77), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 49406
    ids[0, 10:] = 49407  # eos then eos padding
    ids[1, 5], ids[1, 6:] = 49407, 0  # eos then "!" padding
    ids[2, -1] = 49407  # truncated
    return ids


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@torch.no_grad()
def test_outputs_equal_transformers(act, projection):
    theirs, ours = _pair(act, projection)
    ids = _ids()
    a, b = theirs(input_ids=ids, output_hidden_states=True), ours(ids, output_hidden_states=True)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a[0], b[0])
    assert len(a.hidden_states) == len(b.hidden_states) == SMALL["num_hidden_layers"] + 1
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    if projection:
        assert torch.equal(a.text_embeds, b.text_embeds)
    else:
        assert torch.equal(a.pooler_output, b.pooler_output)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    a, b = theirs(input_ids=ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


@torch.no_grad()
def test_folder_loads_into_ours_and_encodes_as_transformers(tmp_path):
    """A folder saved from transformers' model loads as ours (no transformers class), in fp32 and in a dtype."""
    config = transformers.CLIPTextConfig(hidden_act="gelu", **SMALL)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        theirs = transformers.CLIPTextModel(config).eval()
    TextEncoder(build_clip_tokenizer("!"), theirs).save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path)
    assert type(loaded.model) is clip_text.CLIPTextModel
    assert loaded.tokenizer.pad_token_id == 0
    reference = TextEncoder(build_clip_tokenizer("!"), theirs)
    prompts = ["a red circle", "", "two blue squares!"]
    for layer in ("last", "penultimate"):
        assert torch.equal(loaded.encode(prompts, layer=layer), reference.encode(prompts, layer=layer))
    half = TextEncoder.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16
    assert torch.equal(half.model.final_layer_norm.weight, theirs.final_layer_norm.weight.to(torch.bfloat16))
    back = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"))  # transformers reads it
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in theirs.state_dict().items())
    weights = tmp_path / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({**state, "text_model.final_layer_norm.bias": torch.zeros(32, dtype=torch.int64)}, weights)
    with pytest.raises(WeightsError, match="final_layer_norm.bias holds torch.int64"):
        TextEncoder.from_pretrained(tmp_path)
    save_file({**state, "text_model.final_layer_norm.bias": torch.zeros(31)}, weights)
    with pytest.raises(ValueError, match=r"final_layer_norm.bias: expected shape \(32,\), got \(31,\)"):
        TextEncoder.from_pretrained(tmp_path)


def test_config_round_trip_keeps_unknown_keys(tmp_path):
    data = {**transformers.CLIPTextConfig(**SMALL).to_dict(), "architectures": ["CLIPTextModelWithProjection"]}
    config = clip_text.CLIPTextConfig.from_dict(data)
    assert config.hidden_size == 32 and config.extra["initializer_range"] == 0.02
    assert clip_text.model_class(config) is clip_text.CLIPTextModelWithProjection
    kept = {k: v for k, v in data.items() if k not in ("transformers_version", "_name_or_path")}
    assert json.dumps(config.to_dict(), sort_keys=True) == json.dumps(kept, sort_keys=True)
    with pytest.raises(ValueError, match="hidden_act 'swish3'"):
        clip_text.CLIPTextConfig(hidden_act="swish3")
    with pytest.raises(ValueError, match="not divisible"):
        clip_text.CLIPTextConfig(hidden_size=30, num_attention_heads=4)


def test_from_config_with_our_config_builds_ours_seeded():
    config = clip_text.CLIPTextConfig(**SMALL)
    a, b = TextEncoder.from_config(config, seed=5), TextEncoder.from_config(config, seed=5)
    assert type(a.model) is clip_text.CLIPTextModel
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    weight = a.model.embeddings.token_embedding.weight.detach()
    assert abs(weight.std().item() - 0.02) < 0.002  # transformers' CLIP init
    assert a.encode("a red circle").shape == (1, 77, 32)
