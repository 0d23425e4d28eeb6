"""Long prompts and emphasis through the encoders (ldm.networks.prompt_encoder), CLIP (ours, transformers' ids) and
OpenCLIP towers alike: the window convention in closed form, short prompts bit-equal to a plain tokenize-and-encode
(what every encoder computed before windows), negatives padded to the prompt's windows, emphasis as A1111 applies it.

Tiny towers (width 32, 4 heads, 3 layers, the full vocabulary), seeded, fp32 on CPU. Where a window is encoded in
another batch than the pipeline's (alone, or beside other windows), the hidden states agree within 1e-6 (the batch
size changes the matmul blocking); the same batch of ids agrees bit for bit.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import CLIPTextConfig

from ldm.networks.prompt_syntax import emphasize
from ldm.networks.text import OpenCLIPTextEncoder, TextEncoder

TOL = 1e-6
CLIP_CFG = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          hidden_act="quick_gelu", projection_dim=16)
OPENCLIP_CFG = dict(
    embed_dim=16,
    vision_cfg=dict(layers=1, width=32, patch_size=8, image_size=16, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=3),
)
SHORT = ["a photo of a cat", "A Red CIRCLE above a blue square.", "", "Hello, (world)! [x] \\( 16:9 BREAK"]
WORDS = ["red", "green", "blue", "circle", "square", "star", "above", "below", "left", "right"]  # one token each
LONG = " ".join(WORDS[i % 10] for i in range(100)) + ", " + " ".join(["cat"] * 48)  # 100 + 1 + 48 = 149 tokens
EXACT = " ".join(["cat"] * 75)  # 75 content tokens: 77 with bos and eos, the most one window holds


@pytest.fixture(scope="module", params=["clip", "openclip"])
def enc(request):
    if request.param == "clip":
        enc = TextEncoder.from_config(CLIP_CFG, seed=1)
        norm = enc.model.final_layer_norm  # transformers 5: the CLIPTextModel holds it
    else:
        enc = OpenCLIPTextEncoder.from_config(OPENCLIP_CFG, seed=0)
        norm = enc.tower.ln_final
    with torch.no_grad():  # a trained LayerNorm's bias: freshly initialised (0) every window's mean would be 0
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(3)))
    return enc


def _content(enc, prompt):
    return enc.tokenizer(prompt, add_special_tokens=False).input_ids


def _window(enc, ids):
    """[bos, ids, eos, pad...] of the context length: what the tokenizer gives a prompt of these tokens."""
    tok, n = enc.tokenizer, enc.tokenizer.model_max_length
    return [tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * (n - 2 - len(ids))


def _plain(enc, prompts, skip=0):
    """A plain tokenize-and-encode, truncating at 77: what PromptEncoder.encode computed before windows."""
    ids = enc.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return enc.hidden_states(ids, skip)


@torch.no_grad()
def test_short_prompts_are_unchanged(enc):
    """At most 75 content tokens: one window, bit-equal to a plain tokenize-and-encode, no warning; under either
    syntax for a prompt without emphasis, and through encode_pair."""
    assert len(_content(enc, EXACT)) == 75
    prompts = [*SHORT, EXACT]
    ids, weights = enc.window_ids(prompts)
    assert torch.equal(ids[:, 0], enc.tokenize(prompts)) and ids.shape[1] == 1 and bool((weights == 1).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for skip in (0, 1):
            plain = _plain(enc, prompts, skip)
            assert plain.shape == (len(prompts), 77, 32)
            assert torch.equal(enc.encode(prompts, clip_skip=skip), plain)
            c, u = enc.encode_pair(prompts, prompts[::-1], clip_skip=skip)
            assert torch.equal(c, plain) and torch.equal(u, _plain(enc, prompts[::-1], skip))
        no_emphasis = [p for p in prompts if not any(ch in p for ch in "()[]\\") and "BREAK" not in p]
        assert torch.equal(enc.encode(no_emphasis, syntax="a1111"), _plain(enc, no_emphasis))
    assert torch.equal(enc.empty_embedding(2), _plain(enc, ["", ""]))


@torch.no_grad()
def test_long_prompt_is_its_windows_concatenated(enc):
    """Closed form of the convention: a 149-token prompt is [bos, tokens 0-74, eos], [bos, tokens 75-148, eos, pad]
    encoded as a batch of two and concatenated; each window encoded alone agrees within TOL."""
    ids = _content(enc, LONG)
    assert len(ids) == 149
    windows = torch.tensor([_window(enc, ids[:75]), _window(enc, ids[75:])])
    assert windows[0, -1] == enc.tokenizer.eos_token_id and windows[1, -1] == enc.tokenizer.pad_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no truncation warning where windows are used
        got = enc.encode(LONG)
        for skip in (0, 2):
            states = enc.hidden_states(windows, skip)  # (2, 77, D)
            assert torch.equal(enc.encode(LONG, clip_skip=skip), torch.cat([states[0], states[1]])[None])
    assert got.shape == (1, 2 * 77, 32)
    for k in range(2):
        alone = enc.hidden_states(windows[k : k + 1], 0)[0]
        assert (got[0, 77 * k : 77 * (k + 1)] - alone).abs().max() <= TOL
    assert (got[0, :77] - _plain(enc, LONG)[0]).abs().max() <= TOL  # window 0 is the truncated prompt


@torch.no_grad()
def test_prompts_and_negatives_are_padded_with_empty_windows(enc):
    """A batch takes the most windows any prompt needs; a shorter prompt, or the shorter of prompt and negative,
    gets windows of the empty prompt (A1111's empty chunks) after its own."""
    empty = enc.empty_embedding(1)[0]  # (77, D)
    batch = enc.encode([LONG, "a photo of a cat"])
    assert batch.shape == (2, 154, 32)
    assert (batch[1, :77] - _plain(enc, "a photo of a cat")[0]).abs().max() <= TOL
    assert (batch[1, 77:] - empty).abs().max() <= TOL
    for prompts, negatives in (([LONG], ["blurry"]), (["blurry"], [LONG])):
        c, u = enc.encode_pair(prompts, negatives)
        assert c.shape == u.shape == (1, 154, 32)
        short, long_ = (u, c) if prompts == [LONG] else (c, u)
        assert (short[0, :77] - _plain(enc, "blurry")[0]).abs().max() <= TOL
        assert (short[0, 77:] - empty).abs().max() <= TOL
        assert torch.equal(long_, enc.encode(LONG))
    assert enc.encode("blurry", windows=3).shape == (1, 3 * 77, 32)


@torch.no_grad()
def test_max_windows_drops_the_rest_with_a_warning(enc):
    """max_windows = 1 is diffusers' truncation (the first 75 tokens); past the bound the dropped words are named."""
    try:
        enc.max_windows = 1
        dropped = r"2 windows of 75 tokens.*takes 1 \(max_windows\): 74 token\(s\).*namely 'star above.*cat'"
        with pytest.warns(UserWarning, match=dropped):
            got = enc.encode(LONG)
        assert torch.equal(got, _plain(enc, LONG))
    finally:
        enc.max_windows = 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert enc.encode(" ".join(["cat"] * 1200)).shape == (1, 16 * 77, 32)
    with pytest.warns(UserWarning, match=r"17 windows.*takes 16.*1 token\(s\) were dropped, namely 'dog'"):
        enc.windows(" ".join(["cat"] * 1200) + " dog")


@torch.no_grad()
def test_emphasis_is_a1111s(enc):
    """"(cat:1.5)" weights the token "cat" by 1.5 in the hidden states, then the window's mean is restored
    (prompt_syntax.emphasize, tested on its own in test_prompt_syntax.py); the tokens are the plain prompt's."""
    z = enc.encode("a cat sits on a mat")
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5  # bos, "a", "cat"
    got = enc.encode("a (cat:1.5) sits on [a mat]", syntax="a1111")
    weights[0, 5:7] = 1 / 1.1
    assert (got - emphasize(z, weights)).abs().max() <= TOL
    assert (got - z).abs().max() > 1e-3  # the weights change the embedding
    # emphasis in the second window applies to that window alone
    long_got = enc.encode(LONG + " (dog:1.3)", syntax="a1111")
    long_plain = enc.encode(LONG + " dog")
    assert torch.equal(long_got[:, :77], long_plain[:, :77])
    w = torch.ones(1, 77)
    w[0, 1 + 74] = 1.3  # the 150th token is the 75th of window 2
    assert (long_got[:, 77:] - emphasize(long_plain[:, 77:], w)).abs().max() <= TOL
    # escapes are the literal brackets; BREAK starts a window; the plain syntax reads all of it as text
    assert torch.equal(enc.encode("a \\(cat\\)", syntax="a1111"), enc.encode("a (cat)"))
    pair = enc.encode(["a cat", "a dog"]).reshape(1, -1, 32)
    assert torch.equal(enc.encode("a cat BREAK a dog", syntax="a1111"), pair)
    assert torch.equal(enc.encode("a (cat:1.5)"), _plain(enc, "a (cat:1.5)"))
    with pytest.raises(ValueError, match="prompt syntax must be one of"):
        enc.encode("a", syntax="A1111")
