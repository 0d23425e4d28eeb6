"""Prompt text -> weighted token windows: the emphasis syntax the Stable Diffusion community writes, and the 75-token
windows that let a prompt run past CLIP's 77 positions. Pure functions; ldm.networks.prompt_encoder runs them.

Emphasis (`syntax="a1111"`, AUTOMATIC1111's stable-diffusion-webui, modules/prompt_parser.py parse_prompt_attention):
"(text)" multiplies the weight of its tokens by 1.1, "[text]" by 1/1.1, "(text:1.3)" by 1.3; brackets nest (their
factors multiply), an unclosed one applies to the end of the prompt, a stray closing one is plain text; "\\(", "\\)",
"\\[", "\\]" and "\\\\" are the literal characters; the word BREAK (upper case, as its own word) ends the current
window. `syntax="plain"` (the default) reads every character as text, as diffusers does.

Windows (A1111's chunks; diffusers' community lpw pipeline cuts at the same places, compel prefers sentence ends): the
content tokens of a prompt are cut into windows of n - 2 = 75 tokens, each encoded on its own as [bos, tokens, eos,
pad...] (the tokenizer's layout for a short prompt), the hidden states concatenated (B, k x 77, D). A1111's comma
backtracking (moving the words after a comma near a window's end into the next one) is not done: windows are cut at
fixed places.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

SYNTAXES = ("plain", "a1111")
BREAK_WEIGHT = -1.0  # parse_prompt_attention's marker of a BREAK: ("BREAK", -1.0)
ROUND, SQUARE = 1.1, 1 / 1.1  # the factors of "(text)" and "[text]"

# escapes, brackets, ":number)" closing a weighted bracket, runs of plain text, a lone ":" (A1111's tokens)
_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)

Window = tuple[list[int], list[float]]  # content token ids (at most n - 2) and their weights


def check_syntax(syntax: str) -> str:
    """`syntax` if it is one of SYNTAXES, else a ValueError listing them."""
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax must be one of {', '.join(map(repr, SYNTAXES))}, got {syntax!r}")
    return syntax


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) runs of an A1111-syntax prompt, neighbours of equal weight merged, ("BREAK", -1.0) for BREAK;
    the same lists as A1111's parse_prompt_attention (its documented examples: tests/networks/test_prompt_syntax.py);
    a weight that is not a number ("(word:1.2.3)") is a ValueError naming it, where A1111 fails inside float()."""
    runs: list[list] = []
    rounds: list[int] = []  # where each open "(" started in `runs`
    squares: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(runs))
        elif piece == "[":
            squares.append(len(runs))
        elif weight is not None and rounds:
            multiply(rounds.pop(), _number(weight, text))
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    runs.append(["BREAK", BREAK_WEIGHT])
                runs.append([part, 1.0])
    for start in rounds:  # unclosed brackets reach to the end
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    if not runs:
        runs = [["", 1.0]]
    merged = [runs[0]]
    for run in runs[1:]:
        if run[1] == merged[-1][1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _number(weight: str, text: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise ValueError(f"emphasis weight {weight!r} is not a number (in the prompt {text[:60]!r}); write "
                         "\"(text:1.3)\", or \\: and \\) for the literal characters") from None


def prompt_runs(prompt: str, syntax: str = "plain") -> list[tuple[str, float]]:
    """The (text, weight) runs of `prompt` under `syntax`: the whole prompt at weight 1 for "plain"."""
    return [(prompt, 1.0)] if check_syntax(syntax) == "plain" else parse_prompt_attention(prompt)


def is_break(run: tuple[str, float]) -> bool:
    """Whether a run of parse_prompt_attention is its BREAK marker (a weight of -1 on other text is a weight)."""
    return run[0] == "BREAK" and run[1] == BREAK_WEIGHT


def split_windows(runs: Sequence[tuple[Sequence[int], float] | None], size: int) -> list[Window]:
    """Weighted token runs cut into windows of at most `size` tokens; None (a BREAK) closes the current window (even
    an empty one, as A1111). At least one window: an empty prompt gives one empty window."""
    if size < 1:
        raise ValueError(f"a window holds at least one token, got size {size}")
    windows: list[Window] = []
    ids: list[int] = []
    weights: list[float] = []
    for run in runs:
        if run is None:
            windows.append((ids, weights))
            ids, weights = [], []
            continue
        tokens, weight = run
        for token in tokens:
            ids.append(int(token))
            weights.append(float(weight))
            if len(ids) == size:
                windows.append((ids, weights))
                ids, weights = [], []
    if ids or not windows:
        windows.append((ids, weights))
    return windows


def prompt_windows(prompt: str, syntax: str, tokenize: Callable[[list[str]], list[list[int]]], size: int
                   ) -> list[Window]:
    """The windows of `prompt`: its runs under `syntax`, each run's text tokenized on its own by `tokenize` (texts ->
    content ids, no bos/eos; as A1111), cut into windows of `size` tokens."""
    runs = prompt_runs(prompt, syntax)
    texts = [text for text, weight in runs if not is_break((text, weight))]
    ids = iter(tokenize(texts) if texts else [])
    return split_windows([None if is_break(run) else (next(ids), run[1]) for run in runs], size)


def window_rows(window: Window, length: int, bos: int, eos: int, pad: int) -> tuple[list[int], list[float]]:
    """One window as the tokenizer lays out a short prompt: [bos, ids, eos, pad...] of `length`, weight 1 outside
    the content."""
    ids, weights = window
    fill = length - 2 - len(ids)
    if fill < 0:
        raise ValueError(f"a window of {len(ids)} tokens does not fit {length} positions with bos and eos")
    return [bos, *ids, eos, *[pad] * fill], [1.0, *weights, 1.0, *[1.0] * fill]


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis ("Original"): hidden states z (N, n, D) scaled per token by weights (N, n), then each row
    rescaled to the mean it had before (sd_hijack_clip's EmphasisOriginal, here per window of each prompt); the means
    in float32 at least, a row whose weighted mean is 0 left unrescaled (no division by zero)."""
    acc = torch.promote_types(z.dtype, torch.float32)
    before = z.to(acc).mean(dim=(1, 2), keepdim=True)
    z = z * weights.to(z.dtype)[..., None]
    after = z.to(acc).mean(dim=(1, 2), keepdim=True)
    ratio = torch.where(after == 0, torch.ones_like(after), before / after)
    return z * ratio.to(z.dtype)
