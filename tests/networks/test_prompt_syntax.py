"""Emphasis syntax and windows (ldm.networks.prompt_syntax): A1111's parser's documented outputs, its rules on nested
brackets, escapes and BREAK, the window cuts, and the emphasis rescaling's invariants.

Expected parses are A1111's own docstring examples (modules/prompt_parser.py, parse_prompt_attention; compared with ==,
floats included: the same products in the same order) and lists written from its rules (nested factors multiply,
innermost first; compared within 1e-12 relative).
"""

from __future__ import annotations

import pytest
import torch

from ldm.networks.prompt_syntax import (
    BREAK_WEIGHT,
    emphasize,
    parse_prompt_attention,
    prompt_runs,
    prompt_windows,
    split_windows,
    window_rows,
)

# A1111's parse_prompt_attention docstring, verbatim
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]

# from the rules: "(x)" x1.1, "[x]" x1/1.1, "(x:w)" xw, nesting multiplies, unclosed brackets reach the end, stray
# closers and a ":" outside "(x:w)" are text, escapes are literal, BREAK (a word of its own) is ("BREAK", -1)
RULES = [
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
    ("((word:2))", [("word", 2 * 1.1)]),
    ("[(word)]", [("word", 1.1 / 1.1)]),
    ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.5)]),
    ("(word: 0.25 )", [("word", 0.25)]),
    ("(word:-1)", [("word", -1.0)]),
    ("[a:1.2]", [("a:1.2", 1 / 1.1)]),
    ("a) b] c", [("a) b] c", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    ("[unclosed (both", [("unclosed ", 1 / 1.1), ("both", 1.1 / 1.1)]),
    ("\\(1\\) \\[2\\] \\\\ x", [("(1) [2] \\ x", 1.0)]),
    ("a cat BREAK a (dog)", [("a cat", 1.0), ("BREAK", -1.0), ("a ", 1.0), ("dog", 1.1)]),
    ("BREAKFAST, not a break", [("BREAKFAST, not a break", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_parse_matches_a1111_documented_examples(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(("text", "expected"), RULES)
def test_parse_follows_a1111_rules(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_a_weight_that_is_not_a_number_is_named():
    for text in ("(word:1.2.3)", "(word:.)"):
        with pytest.raises(ValueError, match=r"emphasis weight '(1\.2\.3|\.)' is not a number"):
            parse_prompt_attention(text)


def test_plain_syntax_reads_every_character_as_text():
    text = "a (cat:1.5) [dog] \\( BREAK"
    assert prompt_runs(text) == prompt_runs(text, "plain") == [(text, 1.0)]
    assert prompt_runs(text, "a1111") == parse_prompt_attention(text)
    with pytest.raises(ValueError, match="'plain', 'a1111'.*got 'compel'"):
        prompt_runs(text, "compel")


def test_split_windows_cuts_at_fixed_places():
    ids = list(range(1000, 1160))
    for n, sizes in ((0, [0]), (1, [1]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (160, [75, 75, 10])):
        windows = split_windows([(ids[:n], 1.0)], 75)
        assert [len(w[0]) for w in windows] == sizes
        assert [t for w in windows for t in w[0]] == ids[:n]  # every token once, in order
    # runs keep their weights across a cut
    windows = split_windows([(ids[:70], 1.0), (ids[70:80], 1.5)], 75)
    assert windows[0][1] == [1.0] * 70 + [1.5] * 5 and windows[1] == (ids[75:80], [1.5] * 5)
    # a BREAK (None) closes the window; at a full window it leaves an empty one, as A1111's next_chunk
    assert split_windows([([1, 2], 1.0), None, ([3], 2.0)], 75) == [([1, 2], [1.0, 1.0]), ([3], [2.0])]
    assert split_windows([([1, 2], 1.0), None, ([3, 4], 1.0)], 2) == [([1, 2], [1.0, 1.0]), ([], []),
                                                                      ([3, 4], [1.0, 1.0])]
    assert split_windows([([1], 1.0), None], 75) == [([1], [1.0])]
    with pytest.raises(ValueError, match="at least one token"):
        split_windows([], 0)


def test_prompt_windows_tokenizes_each_run_on_its_own():
    seen = []

    def tokenize(texts):
        seen.append(texts)
        return [[len(t)] if t else [] for t in texts]

    windows = prompt_windows("ab (cde:2) BREAK f", "a1111", tokenize, 75)
    assert seen == [["ab ", "cde", "", "f"]]  # A1111 keeps the empty text between ")" and " BREAK "
    assert windows == [([3, 3], [1.0, 2.0]), ([1], [1.0])]
    assert prompt_windows("(cde:2)", "plain", tokenize, 75) == [([7], [1.0])]
    assert BREAK_WEIGHT == -1.0


def test_window_rows_is_the_tokenizer_layout():
    assert window_rows(([5, 6], [1.5, 1.0]), 6, 9, 8, 0) == ([9, 5, 6, 8, 0, 0], [1.0, 1.5, 1.0, 1.0, 1.0, 1.0])
    assert window_rows(([5, 6], [1.0, 1.0]), 4, 9, 8, 0)[0] == [9, 5, 6, 8]
    with pytest.raises(ValueError, match="does not fit"):
        window_rows(([5, 6, 7], [1.0] * 3), 4, 9, 8, 0)


def test_emphasize_scales_tokens_and_restores_each_rows_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 7, 5, generator=g, dtype=torch.float64) + 0.5
    w = 1 + torch.rand(3, 7, generator=g, dtype=torch.float64)
    out = emphasize(z, w)
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), rtol=1e-12, atol=0)  # the mean is restored
    ratio = out / (z * w[..., None])  # one constant per row: tokens keep their relative weights
    assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio), rtol=1e-12, atol=0)
    assert torch.equal(emphasize(z[1:2], w[1:2]), out[1:2])  # a row does not depend on the others
    assert torch.equal(emphasize(z, torch.ones(3, 7, dtype=torch.float64)), z)


def test_emphasize_leaves_a_zero_mean_row_unrescaled():
    """A row whose weighted mean is 0 (e.g. a LayerNorm without bias) is not divided by it: z * w, finite."""
    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    w = torch.tensor([[1.0, 1.5]])
    assert torch.equal(emphasize(z, w), z * w[..., None])
