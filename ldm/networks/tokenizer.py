"""The offline CLIP tokenizer: CLIP's byte-level BPE run by the `tokenizers` package, built exactly as transformers'
CLIPTokenizer builds its backend, so the ids are transformers' (tests/networks/test_tokenizer.py) without importing
transformers (seconds of start-up, issue 32). Saved and read as a diffusers `tokenizer/` folder.

The vocabulary is the one open_clip ships (read from its package data, so nothing is downloaded); the ids equal
open_clip's except that open_clip also un-escapes HTML entities ("&amp;") and runs ftfy. A pad token "!" is set by id,
not registered as a special token: transformers would otherwise split every "!" out of the prompt as id 0
(diffusers' SD 2.x/XL tokenizers do, diffusers#4153); `pad_is_special=True` reproduces that.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.io import ConfigError, read_json, write_text

MAX_LENGTH = 77
# Bounds on what a tokenizer folder may ask: its files' sizes (CLIP's tokenizer.json is 2 MB, the largest published
# ones ~35 MB) and model_max_length (the length every prompt is padded to; CLIP's is 77). transformers writes
# int(1e30) for "no limit", read as MAX_LENGTH.
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20
MAX_MODEL_LENGTH = 8192
UNSET_LENGTH = 10**18
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
# transformers' CLIPTokenizer: the pre-tokenizer's split (contractions, letter runs, single digits, other symbols)
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SUFFIX = "</w>"  # BPE end-of-word marker


@dataclass
class Encoding:
    """What a call returns (transformers' BatchEncoding, the part used): ids as lists, or a tensor (B, n)."""

    input_ids: Any
    attention_mask: Any

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class CLIPTokenizer:
    """CLIP's BPE tokenizer (bos <|startoftext|>, eos <|endoftext|>, lower-cased, whitespace collapsed), called as
    transformers' tokenizer is: `tok(prompts, padding="max_length", max_length=77, truncation=True,
    return_tensors="pt").input_ids`. Truncation keeps bos, the first max_length - 2 tokens and eos.

    pad_token: "<|endoftext|>" for SD 1.x, "!" (id 0, open_clip's padding) for SD 2.x; padding uses its id.
    pad_is_special: register the pad token as special, as transformers does when it reads a folder (diffusers#4153).
    added_tokens: tokens beyond the vocabulary (a textual-inversion embedding's), as a folder lists them: dicts of
    "content", "id" and transformers' AddedToken flags (special, normalized, lstrip, rstrip, single_word).
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *, pad_token: str = EOS,
                 model_max_length: int = MAX_LENGTH, pad_is_special: bool = False,
                 added_tokens: Sequence[dict[str, Any]] = ()) -> None:
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
        from tokenizers.models import BPE

        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"token {token!r} is not in the CLIP vocabulary "
                                 "(pad_token: use '<|endoftext|>' or '!')")
        self.vocab, self.merges = vocab, list(merges)
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = BOS, EOS, EOS, pad_token
        self.bos_token_id, self.eos_token_id, self.pad_token_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self.pad_is_special = pad_is_special
        backend = Tokenizer(BPE(vocab=dict(vocab), merges=self.merges, dropout=None, continuing_subword_prefix="",
                                end_of_word_suffix=_SUFFIX, fuse_unk=False, unk_token=EOS))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        backend.decoder = decoders.ByteLevel()
        special = [BOS, EOS] + ([pad_token] if pad_is_special and pad_token not in (BOS, EOS) else [])
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        for t in sorted(added_tokens, key=lambda t: t["id"]):
            special = bool(t.get("special", False))
            token = AddedToken(t["content"], single_word=bool(t.get("single_word", False)),
                               lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                               normalized=bool(t.get("normalized", not special)), special=special)
            (backend.add_special_tokens if special else backend.add_tokens)([token])
            if backend.token_to_id(t["content"]) != t["id"]:
                raise ValueError(f"added token {t['content']!r} has id {t['id']} in the folder but takes "
                                 f"{backend.token_to_id(t['content'])} here: the added tokens' ids are not consecutive")
        self._backend = backend

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        """The BPE tokens of `text` (no bos/eos)."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None, add_special_tokens: bool = True,
                 verbose: bool = True) -> Encoding:
        """Ids of one text (a list) or of several (a list of lists); return_tensors="pt" gives a tensor (B, n).
        padding: "max_length" (to max_length, default model_max_length), "longest" / True, or False. `verbose` is
        accepted for transformers' signature; nothing is logged."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        limit = self.model_max_length if max_length is None else max_length
        specials = 2 if add_special_tokens else 0
        rows = []
        for one in texts:  # one by one: encode_batch would start a thread pool, which forked data workers warn of
            ids = self._backend.encode(one, add_special_tokens=False).ids
            if truncation:
                ids = ids[: max(limit - specials, 0)]
            rows.append([self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else list(ids))
        width = limit if padding == "max_length" else max(map(len, rows)) if padding in (True, "longest") else None
        masks = [[1] * len(r) + [0] * max((width or 0) - len(r), 0) for r in rows]
        if width is not None:
            rows = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise ValueError("texts of different lengths: pass padding= to make a tensor")
            return Encoding(torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' or None")
        return Encoding(rows[0], masks[0]) if single else Encoding(rows, masks)

    def decode(self, ids: Sequence[int] | Any, skip_special_tokens: bool = False) -> str:
        """Text of `ids`, words separated by one space (as transformers' CLIPTokenizer decodes)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace(_SUFFIX, " ").strip()

    def batch_decode(self, rows: Sequence[Sequence[int]] | Any, skip_special_tokens: bool = False) -> list[str]:
        rows = rows.tolist() if hasattr(rows, "tolist") else rows
        return [self.decode(r, skip_special_tokens) for r in rows]

    def save_pretrained(self, folder: str | Path) -> None:
        save_tokenizer(self, folder)

    def to_transformers(self) -> Any:
        """The same tokenizer as transformers' CLIPTokenizer, for diffusers' pipelines (imports transformers)."""
        from transformers import CLIPTokenizer as HFTokenizer

        special = self.pad_is_special
        tok = HFTokenizer(vocab=dict(self.vocab), merges=list(self.merges), model_max_length=self.model_max_length,
                          pad_token=self.pad_token if special else EOS)
        if not special:
            tok.pad_token_id = self.pad_token_id
        return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (open_clip's and transformers' table)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = [b for b in range(256) if b not in bs]
    return dict(zip(bs + extra, map(chr, cs + [256 + i for i in range(len(extra))])))


def _openclip_bpe_file() -> Path:
    """open_clip's bpe_simple_vocab_16e6.txt.gz, found without importing open_clip (which loads torch and more)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise FileNotFoundError("open_clip's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) was not found: install "
                            "open_clip_torch, or read a tokenizer folder with load_tokenizer")


@functools.lru_cache(maxsize=1)
def _openclip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """open_clip's vocabulary and merges, with its special tokens renamed to transformers' spelling."""
    lines = gzip.open(_openclip_bpe_file()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])  # same slice as open_clip
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + _SUFFIX for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = EOS, model_max_length: int = MAX_LENGTH, *,
                         pad_is_special: bool = False) -> CLIPTokenizer:
    """CLIP's BPE tokenizer (49408 tokens, bos 49406, eos 49407) built offline from open_clip's vocabulary.

    pad_token: "<|endoftext|>" for SD 1.x, "!" (id 0, open_clip's padding) for SD 2.x.
    pad_is_special: register the pad token as special, as transformers does when it reads a folder (diffusers#4153).
    """
    vocab, merges = _openclip_bpe()
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=model_max_length,
                         pad_is_special=pad_is_special)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Write a diffusers `tokenizer/` folder: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json."""
    folder = Path(folder)
    special = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
               "unk_token": tokenizer.unk_token}
    config = {
        **special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
        "model_max_length": int(tokenizer.model_max_length), "tokenizer_class": "CLIPTokenizer",
    }
    texts = {
        "vocab.json": json.dumps(tokenizer.vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(m) for m in tokenizer.merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }
    for name, text in texts.items():
        write_text(text, folder / name)


def _token_text(value: Any, default: str) -> str:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    value = default if value is None else value
    return str(value.get("content", default)) if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, max_bytes=MAX_TOKENIZER_FILE_BYTES)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: one "left right" pair a line after the "#version" header; errors name the file and line."""
    size = path.stat().st_size
    if size > MAX_TOKENIZER_FILE_BYTES:
        raise ConfigError(f"{path} is {size / 2**20:.1f} MiB, more than the {MAX_TOKENIZER_FILE_BYTES / 2**20:.0f} "
                          "MiB a merges file can need: refusing to read it")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text: {e}") from e
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    if not all(len(pair) == 2 for pair in merges):
        number, line = next((n, line) for n, line in enumerate(lines, 1)
                            if line and not line.startswith("#version") and len(line.split()) != 2)
        raise ConfigError(f"{path}, line {number}: expected a pair of tokens, got {line[:80]!r}")
    return merges  # type: ignore[return-value]


def _check_vocab(vocab: Any, where: str) -> dict[str, int]:
    """A vocabulary maps tokens to ids >= 0; the first bad entry is named."""
    if not isinstance(vocab, dict):
        raise ConfigError(f"{where}: the vocabulary must be a JSON object of token -> id, not {type(vocab).__name__}")
    if not all(type(i) is int for i in vocab.values()) or min(vocab.values(), default=0) < 0:
        token, i = next((t, i) for t, i in vocab.items() if type(i) is not int or i < 0)
        raise ConfigError(f"{where}: token {token[:80]!r} has id {i!r}, not an integer >= 0")
    return vocab


def _added_token(entry: Any, where: str) -> dict[str, Any]:
    """One added token (a dict with "content" and an integer "id"), checked."""
    if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or isinstance(entry.get("id"), bool) \
            or not isinstance(entry.get("id"), int) or entry["id"] < 0:
        raise ConfigError(f"{where}: an added token must have a string content and an integer id >= 0, got "
                          f"{str(entry)[:120]}")
    return entry


def _folder_bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict[str, Any]]]:
    """Vocabulary, merges and the added tokens beyond the vocabulary (CLIPTokenizer's `added_tokens`) of a tokenizer
    folder: vocab.json + merges.txt, else the BPE model of tokenizer.json; added tokens from tokenizer.json,
    added_tokens.json and tokenizer_config.json's added_tokens_decoder. Errors name the file."""
    added: dict[int, dict[str, Any]] = {}
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = _check_vocab(_read_json(folder / "vocab.json"), str(folder / "vocab.json"))
        merges = _read_merges(folder / "merges.txt")
    else:
        path = folder / "tokenizer.json"
        data = _read_json(path)
        model = data.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            kind = model.get("type") if isinstance(model, dict) else None
            raise ConfigError(f"{path} holds a {kind} model, not CLIP's BPE")
        vocab = _check_vocab(model.get("vocab"), str(path))
        merges = []
        for m in model.get("merges") or []:
            pair = tuple(m.split()) if isinstance(m, str) else tuple(m) if isinstance(m, list) else ()
            if len(pair) != 2 or not all(isinstance(t, str) for t in pair):
                raise ConfigError(f"{path}: a merge must be a pair of tokens, got {str(m)[:80]}")
            merges.append(pair)
        entries = data.get("added_tokens") or []
        added.update({t["id"]: t for t in (_added_token(e, str(path)) for e in entries)})
    if (folder / "added_tokens.json").is_file():  # the older listing: content -> id, no flags
        path = folder / "added_tokens.json"
        listed = _read_json(path)
        entries = (_added_token({"content": content, "id": i}, str(path)) for content, i in listed.items())
        added.update({t["id"]: t for t in entries})
    decoder = _tokenizer_config(folder).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ConfigError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must map ids to tokens")
    for i, t in decoder.items():
        if isinstance(t, dict):
            if not str(i).isdigit():
                raise ConfigError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder key {i!r} is not an id")
            entry = _added_token({**t, "id": int(i)}, str(folder / "tokenizer_config.json"))
            added[entry["id"]] = entry
    return vocab, merges, [t for i, t in sorted(added.items()) if i >= len(vocab)]


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    return _read_json(path) if path.is_file() else {}


def _model_max_length(config: dict[str, Any], path: Path) -> int:
    """tokenizer_config.json's model_max_length: 77 when unset (missing, null, or transformers' "no limit" int(1e30));
    else an integer in [1, MAX_MODEL_LENGTH], or ConfigError naming the file and key."""
    length = config.get("model_max_length")
    if length is None or (isinstance(length, (int, float)) and not isinstance(length, bool) and length >= UNSET_LENGTH):
        return MAX_LENGTH
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_MODEL_LENGTH:
        raise ConfigError(f"{path}: model_max_length must be an integer in [1, {MAX_MODEL_LENGTH}] (CLIP's is "
                          f"{MAX_LENGTH}), got {length!r}")
    return length


def load_tokenizer(folder: str | Path, *, pad_is_special: bool = False) -> CLIPTokenizer:
    """Read a diffusers `tokenizer/` folder (no hub access); names the missing file when incomplete, and the file
    (and key) when one is malformed, too large (MAX_TOKENIZER_FILE_BYTES) or out of range.

    The pad token is set by id as in `build_clip_tokenizer`, unless pad_is_special (transformers' reading).
    model_max_length is tokenizer_config.json's, 77 when it gives none (`_model_max_length`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    has_json = (folder / "tokenizer.json").is_file()
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing and not has_json:
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {missing} (and has no tokenizer.json)")
    config = _tokenizer_config(folder)
    length = _model_max_length(config, folder / "tokenizer_config.json")
    vocab, merges, added = _folder_bpe(folder)
    pad = _token_text(config.get("pad_token"), EOS)
    special_map = folder / "special_tokens_map.json"
    if "pad_token" not in config and special_map.is_file():
        pad = _token_text(_read_json(special_map).get("pad_token"), EOS)
    try:
        return CLIPTokenizer(vocab, merges, pad_token=pad, model_max_length=length, pad_is_special=pad_is_special,
                             added_tokens=added)
    except (ValueError, TypeError) as e:  # a special token missing from the vocabulary, added tokens out of order
        raise ConfigError(f"{folder}: {e}") from e
