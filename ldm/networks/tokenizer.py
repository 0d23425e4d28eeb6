"""The offline CLIP tokenizer: transformers' CLIPTokenizer from open_clip's BPE vocabulary, saved and read as a
diffusers `tokenizer/` folder.

The tokenizer is transformers' CLIPTokenizer built from the BPE vocabulary that open_clip ships, so nothing is
downloaded; its ids equal open_clip's except that open_clip also un-escapes HTML entities ("&amp;") and runs ftfy.
A pad token "!" is set by id, not registered as a special token: transformers would otherwise split every "!" out of
the prompt as id 0 (diffusers' SD 2.x/XL tokenizers do, diffusers#4153); `pad_is_special=True` reproduces that.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer

from ldm.io import write_text

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


@functools.lru_cache(maxsize=1)
def _openclip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """open_clip's vocabulary and merges, with its special tokens renamed to transformers' spelling."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])  # same slice as open_clip
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _set_pad(tokenizer: CLIPTokenizer, pad_token: str) -> CLIPTokenizer:
    """Pad with `pad_token` by id, leaving it an ordinary token inside prompts (open_clip's behaviour)."""
    pad_id = tokenizer.get_vocab().get(pad_token)
    if pad_id is None:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary (use '<|endoftext|>' or '!')")
    tokenizer.pad_token_id = pad_id
    return tokenizer


def build_clip_tokenizer(pad_token: str = EOS, model_max_length: int = MAX_LENGTH, *,
                         pad_is_special: bool = False) -> CLIPTokenizer:
    """CLIP's BPE tokenizer (49408 tokens, bos 49406, eos 49407) built offline from open_clip's vocabulary.

    pad_token: "<|endoftext|>" for SD 1.x, "!" (id 0, open_clip's padding) for SD 2.x.
    pad_is_special: register the pad token as special, as transformers does when it reads a folder (diffusers#4153).
    """
    vocab, merges = _openclip_bpe()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary (use '<|endoftext|>' or '!')")
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
                              pad_token=pad_token if pad_is_special else EOS)
    return tokenizer if pad_is_special else _set_pad(tokenizer, pad_token)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: str | Path) -> None:
    """Write a diffusers `tokenizer/` folder: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json."""
    folder = Path(folder)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = {
        "bos_token": str(tokenizer.bos_token),
        "eos_token": str(tokenizer.eos_token),
        "pad_token": str(tokenizer.pad_token),
        "unk_token": str(tokenizer.unk_token),
    }
    config = {
        **special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
        "model_max_length": int(tokenizer.model_max_length), "tokenizer_class": "CLIPTokenizer",
    }
    texts = {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2),
        "tokenizer_config.json": json.dumps(config, indent=2),
    }
    for name, text in texts.items():
        write_text(text, folder / name)


def load_tokenizer(folder: str | Path, *, pad_is_special: bool = False) -> CLIPTokenizer:
    """Read a diffusers `tokenizer/` folder (no hub access); names the missing file when incomplete.

    The pad token is set by id as in `build_clip_tokenizer`, unless pad_is_special (transformers' reading).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    has_json = (folder / "tokenizer.json").is_file()
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing and not has_json:
        raise FileNotFoundError(f"tokenizer folder {folder} lacks {missing} (and has no tokenizer.json)")
    if pad_is_special:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json"
                                                                             ).is_file() else {}
    pad = config.get("pad_token", EOS)
    pad = pad.get("content", EOS) if isinstance(pad, dict) else pad
    return _set_pad(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, pad_token=EOS), pad)
