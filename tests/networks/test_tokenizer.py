"""Our CLIP tokenizer (the `tokenizers` package, no transformers import) gives transformers' CLIPTokenizer's ids,
truncation, padding and decoding on varied text: punctuation, unicode, whitespace, special-token strings, long and
empty prompts; built offline, read from our folders and from folders transformers wrote."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPTokenizer as HFTokenizer

from ldm.loading.sources import DEFAULT_MODEL
from ldm.networks.tokenizer import (
    EOS,
    CLIPTokenizer,
    _openclip_bpe,
    build_clip_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

TEXTS = [
    "", " ", "a red circle", "A RED Circle!!", "wow! !!", "a   red\tcircle\non  blue", "  leading and trailing  ",
    "don't stop, it's 3.14159 o'clock; we'll see", "don’t (curly) “quotes” — dashes…", "a,b;c:d-e_f/g\\h|i",
    "naïve café résumé", "e\u0301 (combining) vs é", "ﬁ ligature Ａｂｃ full-width", "Straße İstanbul ΣΑΣ",
    "日本語のテキスト 中文 한국어", "emoji 🎨🔴 test 👩‍👩‍👧", "ÿ\x00\x7f control \u200b zero-width",
    "<|endoftext|> inside", "<|startoftext|>start and end<|endoftext|>", "a &amp; b &lt;c&gt;",
    "#hashtag @user http://x.y/z?q=1&r=2", "1234567890 0.5 -3e10", "x" * 300,
    " ".join(["cat"] * 80), "a photo of " + ", ".join(f"object {i}" for i in range(60)),
]


def _reference(pad_token: str, pad_is_special: bool = False, model_max_length: int = 77) -> HFTokenizer:
    """transformers' CLIPTokenizer on the same vocabulary (the pad set by id unless pad_is_special)."""
    vocab, merges = _openclip_bpe()
    tok = HFTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                      pad_token=pad_token if pad_is_special else EOS)
    if not pad_is_special:
        tok.pad_token_id = vocab[pad_token]
    return tok


def _same(ours: CLIPTokenizer, theirs: HFTokenizer, texts: list[str] = TEXTS) -> None:
    for kwargs in ({"padding": "max_length", "max_length": 77, "truncation": True},
                   {"padding": "max_length", "truncation": True},  # max_length: model_max_length
                   {"truncation": False}, {"add_special_tokens": False}, {"padding": "longest"},
                   {"padding": "max_length", "max_length": 16, "truncation": True}):
        a, b = ours(texts, **kwargs), theirs(texts, verbose=False, **kwargs)
        assert a.input_ids == b.input_ids, kwargs
        if "padding" in kwargs:
            assert a.attention_mask == b.attention_mask, kwargs
    for text in texts:
        ids = theirs(text, verbose=False).input_ids
        assert ours(text).input_ids == ids, text
        assert ours.tokenize(text) == theirs.tokenize(text), text
        assert ours.decode(ids) == theirs.decode(ids), text
    pt = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ours(texts, **pt).input_ids, theirs(texts, **pt).input_ids)
    assert ours.pad_token_id == theirs.pad_token_id and len(ours) == len(theirs)
    assert ours.get_vocab() == theirs.get_vocab()


@pytest.mark.parametrize("pad_token", [EOS, "!"])
def test_ids_equal_transformers(pad_token):
    _same(build_clip_tokenizer(pad_token), _reference(pad_token))


def test_pad_is_special_equals_transformers():
    """Registering "!" as special (transformers' reading of SD 2.x folders) splits every "!" out as id 0 in both."""
    ours, theirs = build_clip_tokenizer("!", pad_is_special=True), _reference("!", pad_is_special=True)
    _same(ours, theirs)
    assert ours("wow!", add_special_tokens=False).input_ids[-1] == 0


def test_shorter_context_equals_transformers():
    _same(build_clip_tokenizer("!", model_max_length=16), _reference("!", model_max_length=16))


def test_bundled_folder_equals_transformers_reading():
    """The bundled model's tokenizer/ as we read it (pad "!" by id) and as transformers reads it (pad special)."""
    folder = DEFAULT_MODEL / "tokenizer"
    theirs = HFTokenizer.from_pretrained(str(folder), local_files_only=True, pad_token=EOS)
    theirs.pad_token_id = theirs.get_vocab()["!"]
    _same(load_tokenizer(folder), theirs)
    _same(load_tokenizer(folder, pad_is_special=True), HFTokenizer.from_pretrained(str(folder), local_files_only=True))


def test_folders_transformers_wrote(tmp_path):
    """A folder written by transformers (tokenizer.json, added_tokens_decoder), with and without vocab.json."""
    theirs = _reference(EOS)
    theirs.save_pretrained(tmp_path / "full")
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    _same(load_tokenizer(tmp_path / "full"), HFTokenizer.from_pretrained(str(tmp_path / "full")))
    theirs.save_pretrained(tmp_path / "json_only")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "json_only" / name).unlink(missing_ok=True)
    _same(load_tokenizer(tmp_path / "json_only"), theirs)


def test_added_tokens_of_a_folder(tmp_path):
    """Tokens added beyond the vocabulary (a textual-inversion embedding's) keep their ids."""
    theirs = _reference(EOS)
    theirs.add_tokens(["<my-style>", "<other>"])
    theirs.add_tokens(["<Special>"], special_tokens=True)
    theirs.save_pretrained(tmp_path / "tok")
    ours = load_tokenizer(tmp_path / "tok")
    texts = ["a <my-style> cat", "<other><my-style>", "A <MY-STYLE> <Special> <special>", "plain"]
    _same(ours, theirs, texts)
    assert [ours.decode(ours(t).input_ids, skip_special_tokens=True) for t in texts] == \
        [theirs.decode(theirs(t).input_ids, skip_special_tokens=True) for t in texts]
    assert ours("<other>").input_ids[1] == 49409


def test_our_folder_round_trip_and_transformers_reads_it(tmp_path):
    for pad in (EOS, "!"):
        ours = build_clip_tokenizer(pad)
        save_tokenizer(ours, tmp_path / pad[0])
        assert json.loads((tmp_path / pad[0] / "tokenizer_config.json").read_text())["pad_token"] == pad
        back = load_tokenizer(tmp_path / pad[0])
        assert back.vocab == ours.vocab and back.merges == ours.merges and back.pad_token_id == ours.pad_token_id
        read = HFTokenizer.from_pretrained(str(tmp_path / pad[0]), pad_token=EOS)
        read.pad_token_id = ours.pad_token_id
        _same(back, read, TEXTS[:6])


def test_to_transformers_is_the_same_tokenizer():
    for pad, special in ((EOS, False), ("!", False), ("!", True)):
        ours = build_clip_tokenizer(pad, pad_is_special=special)
        _same(ours, ours.to_transformers(), TEXTS[:8])


def test_errors():
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        build_clip_tokenizer("<pad>")
    with pytest.raises(ValueError, match="padding="):
        build_clip_tokenizer()(["a", "a b c"], return_tensors="pt")
