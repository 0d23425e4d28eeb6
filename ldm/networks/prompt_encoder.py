"""PromptEncoder: what every text encoder shares (CLIP's TextEncoder and the OpenCLIP one, ldm.networks.text): prompts
-> windows of token ids -> per-token hidden states, long prompts and emphasis (ldm.networks.prompt_syntax), the layer
read (diffusers' clip_skip) and the cached empty-prompt embedding.

A prompt of at most n - 2 content tokens (n the tokenizer's model_max_length, CLIP's 77) is one window: exactly the
ids and hidden states (B, n, D) of a plain tokenize-and-encode, as diffusers computes them. A longer one takes
k = ceil(tokens / (n - 2)) windows, each [bos, 75 tokens, eos, pad...], encoded on its own, concatenated to
(B, k n, D) (A1111's convention); prompts of a batch with fewer windows, and a negative prompt beside a longer prompt
(encode_pair), are padded with windows of the empty prompt (A1111's empty chunks). At most `max_windows` windows (a
sane bound on the U-Net's cross-attention length): past it the rest is dropped with a warning naming it;
`max_windows = 1` is diffusers' truncation at 77 tokens.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn

from ldm.networks.prompt_syntax import Window, check_syntax, emphasize, prompt_windows, window_rows
from ldm.networks.tokenizer import CLIPTokenizer

Layer = Literal["last", "penultimate"] | int
MAX_WINDOWS = 16  # 16 x 75 = 1200 content tokens per prompt


def clip_skip_of(layer: Layer, num_layers: int) -> int:
    """Number of final transformer layers to skip: "last" -> 0, "penultimate" -> 1, an int is diffusers' clip_skip."""
    if layer == "last":
        skip = 0
    elif layer == "penultimate":
        skip = 1
    elif isinstance(layer, int) and not isinstance(layer, bool):
        skip = layer
    else:
        raise ValueError(f"layer must be 'last', 'penultimate' or an int clip_skip, got {layer!r}")
    if not 0 <= skip < num_layers:
        raise ValueError(f"clip_skip {skip} is out of range for a text encoder with {num_layers} layers")
    return skip


class PromptEncoder(nn.Module):
    """Tokenize prompts into windows of the context length (CLIP's 77) and map them to per-token hidden states
    (B, k x context length, D); k = 1 for prompts that fit (module docstring)."""

    def __init__(self, tokenizer: CLIPTokenizer, layer: Layer = "last") -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.layer = layer
        self.max_windows = MAX_WINDOWS  # set to 1 for diffusers' truncation at the context length
        self._empty: dict[tuple, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    # subclasses provide these
    num_layers: int
    hidden_size: int

    def hidden_states(self, input_ids: torch.Tensor, skip: int) -> torch.Tensor:
        raise NotImplementedError

    @property
    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """Token ids (B, model_max_length): bos, prompt tokens, eos, padding; warns naming what truncation drops (one
        window: what a CLIP text model scores, e.g. CLIP similarity; `window_ids` gives a long prompt's windows)."""
        prompts = _prompt_list(prompts)
        n = self.tokenizer.model_max_length
        for prompt, ids in zip(prompts, self.tokenizer(list(prompts), truncation=False, verbose=False).input_ids):
            if len(ids) > n:
                dropped = ids[n - 1 : -1]  # content tokens past the n - 2 that fit between bos and eos
                warnings.warn(
                    f"prompt is {len(ids)} tokens, CLIP takes {n}: {len(dropped)} token(s) were dropped, "
                    f"namely {self.tokenizer.decode(dropped)!r} (prompt starts {prompt[:40]!r})",
                    stacklevel=3,
                )
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt"
        ).input_ids

    def windows(self, prompts: str | list[str], syntax: str = "plain") -> list[list[Window]]:
        """Each prompt's windows of at most n - 2 weighted content tokens (ldm.networks.prompt_syntax), at most
        `max_windows` of them: past that the rest is dropped with a warning naming it."""
        prompts, size = _prompt_list(prompts), self.tokenizer.model_max_length - 2
        check_syntax(syntax)

        def tokenize(texts: list[str]) -> list[list[int]]:
            return self.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids

        out = []
        for prompt in prompts:
            found = prompt_windows(prompt, syntax, tokenize, size)
            if len(found) > self.max_windows:
                dropped = [t for ids, _ in found[self.max_windows:] for t in ids]
                warnings.warn(
                    f"prompt is {len(found)} windows of {size} tokens, this encoder takes {self.max_windows} "
                    f"(max_windows): {len(dropped)} token(s) were dropped, namely "
                    f"{self.tokenizer.decode(dropped)!r} (prompt starts {prompt[:40]!r})", stacklevel=4)
                found = found[: self.max_windows]
            out.append(found)
        return out

    def window_ids(self, prompts: str | list[str], *, syntax: str = "plain", windows: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, k, n) and emphasis weights (B, k, n) of the prompts' windows, k the most any prompt needs
        (at least `windows`), shorter prompts padded with empty-prompt windows. ids[:, 0] is `tokenize` for prompts
        that fit: the window a pooled output (SDXL's) reads."""
        return self._stack(self.windows(prompts, syntax), windows)

    def _stack(self, found: list[list[Window]], windows: int) -> tuple[torch.Tensor, torch.Tensor]:
        tok, n = self.tokenizer, self.tokenizer.model_max_length
        k = max(windows, *map(len, found))
        rows = [window_rows(w, n, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
                for one in found for w in one + [([], [])] * (k - len(one))]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).view(len(found), k, n)
        return ids, torch.tensor([r[1] for r in rows], dtype=torch.float32).view(len(found), k, n)

    def _skip(self, layer: Layer | None, clip_skip: int | None) -> int:
        if layer is not None and clip_skip is not None:
            raise ValueError("pass either layer or clip_skip, not both")
        return clip_skip_of(clip_skip if clip_skip is not None else (layer if layer is not None else self.layer),
                            self.num_layers)

    def encode_ids(self, ids: torch.Tensor, weights: torch.Tensor | None, skip: int) -> torch.Tensor:
        """Hidden states (B, k n, D) of window ids (B, k, n): each window encoded on its own, emphasis applied to it
        where a weight is not 1 (prompt_syntax.emphasize), the windows concatenated."""
        b, k, n = ids.shape
        z = self.hidden_states(ids.reshape(b * k, n).to(self._param.device), skip)  # (B k, n, D)
        if weights is not None and bool((weights != 1).any()):
            z = emphasize(z, weights.reshape(b * k, n).to(z.device))
        return z.reshape(b, k * n, z.shape[-1])

    def encode(self, prompts: str | list[str], *, layer: Layer | None = None, clip_skip: int | None = None,
               syntax: str = "plain", windows: int = 1) -> torch.Tensor:
        """Per-token hidden states (B, k n, D) of `layer` (default: the encoder's), final LayerNorm applied; k windows
        (at least `windows`); `syntax="a1111"` reads emphasis (ldm.networks.prompt_syntax)."""
        skip = self._skip(layer, clip_skip)
        return self.encode_ids(*self.window_ids(prompts, syntax=syntax, windows=windows), skip)

    def encode_pair(self, prompts: list[str], negatives: list[str], *, layer: Layer | None = None,
                    clip_skip: int | None = None, syntax: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
        """(c, c_negative) for classifier-free guidance: both batches encoded alike (`encode`), the one with fewer
        windows padded with empty-prompt windows, so both have the same sequence length."""
        with warnings.catch_warnings():  # only counted here: encode warns of what it drops
            warnings.simplefilter("ignore")
            k = max(map(len, self.windows(prompts, syntax) + self.windows(negatives, syntax)))
        options: dict[str, Any] = {"layer": layer, "clip_skip": clip_skip, "syntax": syntax, "windows": k}
        return self.encode(prompts, **options), self.encode(negatives, **options)

    def forward(self, prompts: str | list[str], **options: Any) -> torch.Tensor:
        return self.encode(prompts, **options)

    def empty_embedding(self, batch_size: int = 1, *, layer: Layer | None = None) -> torch.Tensor:
        """encode("") repeated batch_size times: the unconditional c for classifier-free guidance, cached in eval
        mode (in training mode the weights change under it, e.g. ldm.training.unet's train_text_encoder: encoded afresh)."""
        skip = clip_skip_of(self.layer if layer is None else layer, self.num_layers)
        if self.training:
            with torch.no_grad():
                return self.encode("", clip_skip=skip).detach().expand(batch_size, -1, -1).clone()
        key = (self._param.device, self._param.dtype, skip)
        if key not in self._empty:
            with torch.no_grad():
                self._empty[key] = self.encode("", clip_skip=skip).detach()
        return self._empty[key].expand(batch_size, -1, -1).clone()

    def clear_cache(self) -> None:
        """Forget cached empty-prompt embeddings (done automatically by load_state_dict)."""
        self._empty.clear()


def _prompt_list(prompts: Any) -> list[str]:
    """A prompt or a non-empty list of them, else the error naming what was given."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is an empty list")
    return list(prompts)
