"""Text conditioning: tokenizer ids vs open_clip, encoders vs transformers/diffusers/open_clip, conversion, I/O.

Tiny towers (width 32, 4 heads, 3 layers, full 49408-token vocabulary), seeded random weights, fp32 on CPU.
Tolerance for comparing two different implementations of the same network (nn.MultiheadAttention vs transformers'
SDPA attention): max abs error <= 1e-5; the same implementation on the same ids must agree bit for bit.
"""

from __future__ import annotations

import json
import types
import warnings

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.networks.text import OpenCLIPTextEncoder, TextEncoder, hub_state_dict, load_hub_state_dict
from ldm.networks.tokenizer import EOS, build_clip_tokenizer, load_tokenizer, save_tokenizer
from ldm.networks.text_openclip import (
    ConversionError,
    openclip_text_config,
    openclip_to_transformers,
    text_tower_state_dict,
    transformers_to_openclip,
)

TOL = 1e-5
PROMPTS = [
    "a photo of a cat",
    "A Red CIRCLE above a blue square.",
    "Hello, world! (really?) -- yes... #1 @home $5.00 50% a+b=c 'quoted' \"double\" it's we'll",
    "café naïve résumé Zürich 東京タワー Ελληνικά 😀🎨 ñ",
    "tabs\tand\nnewlines   and    spaces",
    "",
    " ".join(f"word{i}" for i in range(40)),  # > 77 tokens: truncated by tokenize, two windows in encode
]
OPENCLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=3),
)
CLIP_CFG = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          hidden_act="quick_gelu", projection_dim=16)


@pytest.fixture(scope="module")
def tok_eos():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def tok_bang():
    return build_clip_tokenizer(pad_token="!")


@pytest.fixture(scope="module")
def openclip_enc():
    return OpenCLIPTextEncoder.from_config(OPENCLIP_CFG, seed=0)


@pytest.fixture(scope="module")
def converted(openclip_enc):
    """CLIPTextModel(WithProjection) holding the open_clip tower's weights (all 3 layers)."""
    sd = openclip_enc.model.state_dict()
    config = openclip_text_config(sd, num_heads=4)
    model = CLIPTextModelWithProjection(config).eval()
    load_hub_state_dict(model, openclip_to_transformers(sd, config, with_projection=True))
    return config, model


@pytest.fixture(scope="module")
def clip_enc():
    return TextEncoder.from_config(CLIP_CFG, seed=1)


# ------------------------------------------------------------------------------------------------ tokenizer
def _warned(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_tokenizer_ids_equal_open_clip(tok_eos, tok_bang):
    """Pad "!" (id 0) reproduces open_clip.tokenize exactly; pad eos differs only in the padding positions."""
    ref = open_clip.tokenize(PROMPTS)  # (N, 77), truncated the open_clip way
    simple = SimpleTokenizer()
    assert tok_eos.pad_token_id == 49407 and tok_bang.pad_token_id == 0 and len(tok_eos) == 49408
    bang = tok_bang(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    eos = tok_eos(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(bang, ref)
    for i, prompt in enumerate(PROMPTS):
        n = int((ref[i] != 0).sum())
        assert torch.equal(eos[i, :n], ref[i, :n]) and bool((eos[i, n:] == 49407).all())
        content = tok_eos(prompt, add_special_tokens=False, verbose=False).input_ids
        assert content == simple.encode(prompt)
    assert n == 77 and ref[-1, -1] == 49407  # the long prompt was truncated and ends in eos


def test_tokenizer_known_differences_from_open_clip(tok_bang):
    """Documented divergences: HTML entities (open_clip unescapes them); with pad_is_special=True, transformers'
    and diffusers' SD 2.x reading, every "!" becomes the pad id 0 (diffusers#4153); by default it does not."""
    simple = SimpleTokenizer()
    assert tok_bang("a &amp; b", add_special_tokens=False).input_ids != simple.encode("a &amp; b")
    special = build_clip_tokenizer("!", pad_is_special=True)
    vocab = tok_bang.get_vocab()
    expected = [vocab["wow</w>"], vocab["!</w>"], vocab["!!</w>"]]
    assert tok_bang("wow! !!", add_special_tokens=False).input_ids == simple.encode("wow! !!") == expected
    assert special("wow! !!", add_special_tokens=False).input_ids == simple.encode("wow") + [0, 0, 0]


def test_tokenizer_folder_round_trip(tmp_path, tok_eos, tok_bang):
    for tok in (tok_eos, tok_bang):
        folder = tmp_path / f"tokenizer_{tok.pad_token_id}"
        save_tokenizer(tok, folder)
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"])
        assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == tok.pad_token
        loaded = load_tokenizer(folder)
        assert loaded.pad_token_id == tok.pad_token_id and loaded.model_max_length == 77
        a = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        b = loaded(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        assert a == b
    quirk = load_tokenizer(folder, pad_is_special=True)  # what transformers/diffusers make of the same folder
    assert quirk.pad_token_id == 0 and quirk("!", add_special_tokens=False).input_ids == [0]
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(folder)


def test_truncation_warns_with_count_and_text(clip_enc):
    prompt = " ".join(["cat"] * 80)  # 80 content tokens; 75 fit between bos and eos
    with pytest.warns(UserWarning, match=r"82 tokens.*5 token\(s\) were dropped.*'cat cat cat cat cat'"):
        ids = clip_enc.tokenize(prompt)
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 and bool((ids[0, 1:-1] == ids[0, 1]).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip_enc.tokenize(" ".join(["cat"] * 75))  # exactly fits: no warning


# ---------------------------------------------------------------------------------------- CLIP (transformers)
class _DiffusersShim:
    """Gives a transformers-5 CLIPTextModel the `.text_model` attribute diffusers' clip_skip path reads."""

    def __init__(self, model):
        self.model, self.text_model, self.config, self.dtype = model, model, model.config, model.dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@torch.no_grad()
def test_text_encoder_matches_clip_text_model_and_diffusers(clip_enc):
    from diffusers import StableDiffusionPipeline

    prompts = PROMPTS[:4]
    ids = clip_enc.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    out = clip_enc.model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(clip_enc.encode(prompts), out.last_hidden_state)
    assert clip_enc.encode(prompts).shape == (4, 77, clip_enc.hidden_size) and clip_enc.hidden_size == 32
    fake = types.SimpleNamespace(text_encoder=_DiffusersShim(clip_enc.model), tokenizer=clip_enc.tokenizer, unet=None)
    ref, _ = StableDiffusionPipeline.encode_prompt(fake, prompts, "cpu", 1, False)
    assert torch.equal(clip_enc.encode(prompts), ref)
    for skip in (1, 2):
        ref, _ = StableDiffusionPipeline.encode_prompt(fake, prompts, "cpu", 1, False, clip_skip=skip)
        assert torch.equal(clip_enc.encode(prompts, clip_skip=skip), ref)
        assert torch.equal(clip_enc.encode(prompts, layer=skip), ref)
        assert (ref - out.last_hidden_state).abs().max() > 0.1  # a different layer really is different
    assert torch.equal(clip_enc.encode(prompts, layer="penultimate"), clip_enc.encode(prompts, clip_skip=1))


def test_layer_option_errors(clip_enc):
    with pytest.raises(ValueError, match="out of range"):
        clip_enc.encode("a", clip_skip=3)
    with pytest.raises(ValueError, match="'last', 'penultimate'"):
        clip_enc.encode("a", layer="first")
    with pytest.raises(ValueError, match="either layer or clip_skip"):
        clip_enc.encode("a", layer="last", clip_skip=1)
    with pytest.raises(TypeError, match="list of strings"):
        clip_enc.encode(["a", 3])


@torch.no_grad()
def test_empty_embedding_is_encode_empty_and_cached(clip_enc):
    e = clip_enc.empty_embedding(3)
    assert e.shape == (3, 77, 32)
    assert torch.equal(e, clip_enc.encode(["", "", ""]))
    assert torch.equal(clip_enc.empty_embedding(1, layer="penultimate"), clip_enc.encode("", layer="penultimate"))
    assert len(clip_enc._empty) == 2
    clip_enc.load_state_dict(clip_enc.state_dict())
    assert len(clip_enc._empty) == 0


@torch.no_grad()
def test_empty_embedding_is_not_cached_in_training_mode():
    """A text encoder being trained (ldm.training.unet's train_text_encoder) changes under the cache: in training mode
    empty_embedding encodes afresh and follows a weight change; back in eval mode it caches again."""
    enc = TextEncoder.from_config(CLIP_CFG, seed=2).train()
    before = enc.empty_embedding(1)
    next(enc.parameters()).add_(0.5)  # an optimizer step, not a load_state_dict
    after = enc.empty_embedding(1)
    assert not torch.equal(before, after) and torch.equal(after, enc.encode(""))
    assert len(enc._empty) == 0
    enc.eval()
    assert torch.equal(enc.empty_embedding(2), enc.encode(["", ""])) and len(enc._empty) == 1


@torch.no_grad()
def test_save_load_round_trip_bit_exact(tmp_path, clip_enc):
    clip_enc.save_pretrained(tmp_path)
    assert sorted(p.name for p in (tmp_path / "text_encoder").iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "text_encoder" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "text_model.encoder.layers.2.self_attn.q_proj.weight" in keys and all(
        k.startswith("text_model.") for k in keys)
    loaded = TextEncoder.from_pretrained(tmp_path)
    a, b = clip_enc.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.encode(PROMPTS[:3]), clip_enc.encode(PROMPTS[:3]))
    assert loaded.tokenizer.pad_token == EOS
    plain = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder"))  # transformers' own loader agrees
    assert all(torch.equal(plain.state_dict()[k], a[k]) for k in a)
    (tmp_path / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        TextEncoder.from_pretrained(tmp_path)


def test_hub_name_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="no hub is reachable.*local folder"):
        TextEncoder.from_pretrained("stabilityai/stable-diffusion-2-1")
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        TextEncoder.from_pretrained("./no/such/folder")


# ------------------------------------------------------------------------------------------------ OpenCLIP
@torch.no_grad()
def test_openclip_matches_converted_clip_text_model(openclip_enc, converted):
    config, model = converted
    hf = TextEncoder(build_clip_tokenizer("!"), model)
    prompts = PROMPTS
    for layer in ("last", "penultimate", 2):
        a = _warned(openclip_enc.encode, prompts, layer=layer)
        b = _warned(hf.encode, prompts, layer=layer)
        assert a.shape == (len(prompts), 2 * 77, 32)  # the last prompt is two 75-token windows, the others padded
        assert (a - b).abs().max() <= TOL
    # open_clip's own intermediates (ln_final applied) for the penultimate layer, and its pooled projection
    ids = openclip_enc.tokenize(PROMPTS[:4])
    inter = openclip_enc.model.forward_intermediates(text=ids, text_indices=[1], normalize_intermediates=True,
                                                     intermediates_only=True)["text_intermediates"][0]
    assert (openclip_enc.encode(PROMPTS[:4], layer="penultimate") - inter).abs().max() <= TOL
    # EOT pooling: open_clip takes argmax(ids), transformers the first eos; projection transposed correctly
    assert (model(input_ids=ids).text_embeds - openclip_enc.model.encode_text(ids)).abs().max() <= TOL


@torch.no_grad()
def test_sd2_style_dropped_last_layer(openclip_enc):
    """drop_last_layers=1 (diffusers' SD 2.x layout): the 2-layer model's last state = open_clip's penultimate."""
    sd = openclip_enc.model.state_dict()
    config = openclip_text_config(sd, num_heads=4, drop_last_layers=1)
    assert config.num_hidden_layers == 2 and config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5
    model = CLIPTextModel(config).eval()
    load_hub_state_dict(model, openclip_to_transformers(sd, config))
    hf = TextEncoder(build_clip_tokenizer("!"), model)
    assert (hf.encode(PROMPTS[:4]) - openclip_enc.encode(PROMPTS[:4], layer="penultimate")).abs().max() <= TOL


@torch.no_grad()
def test_causal_mask_and_padding_invariance(openclip_enc, clip_enc):
    """Token i only sees tokens <= i: changing token k leaves positions < k unchanged, and the padding token
    (eos for SD 1.x, "!" for SD 2.x) cannot change any state up to and including the first eos."""
    for enc in (openclip_enc, clip_enc):
        ids = enc.tokenize("a photo of a cat")
        changed = ids.clone()
        changed[0, 4] = 1000
        a, b = enc.hidden_states(ids, 0), enc.hidden_states(changed, 0)
        assert (a[:, :4] - b[:, :4]).abs().max() <= 1e-6
        assert (a[:, 4:] - b[:, 4:]).abs().amax(-1).min() > 1e-3
        other_pad = ids.clone()
        eot = int((ids[0] == 49407).nonzero()[0])
        other_pad[0, eot + 1:] = 0 if ids[0, -1] == 49407 else 49407
        c = enc.hidden_states(other_pad, 0)
        assert (a[:, : eot + 1] - c[:, : eot + 1]).abs().max() <= 1e-6


# ------------------------------------------------------------------------------------------------ conversion
def test_conversion_round_trip_and_errors(openclip_enc, converted):
    config, model = converted
    sd = openclip_enc.model.state_dict()
    tower = text_tower_state_dict(sd)
    back = transformers_to_openclip(hub_state_dict(model), config)
    assert back.keys() == tower.keys() and all(torch.equal(back[k], tower[k]) for k in tower)
    hub = openclip_to_transformers(sd, config, with_projection=True)
    assert torch.equal(torch.cat([hub[f"text_model.encoder.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"]),
                       tower["transformer.resblocks.1.attn.in_proj_weight"])

    bad = dict(sd)
    bad["transformer.resblocks.1.ln_2.weight"] = torch.zeros(31)
    with pytest.raises(ConversionError, match=r"resblocks\.1\.ln_2\.weight: expected shape \(32,\).*got \(31,\)"):
        openclip_to_transformers(bad, config)
    bad = {k: v for k, v in sd.items() if k != "transformer.resblocks.2.mlp.c_fc.bias"}
    with pytest.raises(ConversionError, match=rf"missing key 'transformer\.resblocks\.2\.mlp\.c_fc\.bias'.*\({config.intermediate_size},\)"):
        openclip_to_transformers(bad, config)
    bad = dict(sd, **{"transformer.resblocks.0.attn.q_norm.weight": torch.ones(8)})
    with pytest.raises(ConversionError, match=r"unexpected.*resblocks\.0\.attn\.q_norm\.weight"):
        openclip_to_transformers(bad, config)
    bad = dict(hub)
    bad["text_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 16)
    with pytest.raises(ConversionError, match=r"k_proj\.weight: expected shape \(32, 32\).*got \(32, 16\)"):
        transformers_to_openclip(bad, config)
    with pytest.raises(ValueError, match=r"token_embedding.weight: expected shape \(49408, 32\), got \(10, 32\)"):
        load_hub_state_dict(model, dict(hub, **{"text_model.embeddings.token_embedding.weight": torch.zeros(10, 32)}))
