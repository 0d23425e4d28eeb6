"""SDXL's text conditioning (Podell et al. 2023, sec. 2.1): two CLIP text encoders read side by side.

`text_encoder/` is OpenAI's CLIP ViT-L (a CLIPTextModel), `text_encoder_2/` OpenCLIP ViT-bigG as transformers'
CLIPTextModelWithProjection (its tokenizer pads with "!"). Each gives the hidden states of its penultimate layer
*without* the final LayerNorm (diffusers' `hidden_states[-2]`; clip_skip k: `hidden_states[-(k + 2)]`); the two are
concatenated on the feature axis, (B, n, 768 + 1280) = (B, n, 2048) for SDXL. The second also gives the pooled text
embedding: the projection (`text_projection`) of its final-LayerNorm state at the end-of-text token, (B, 1280), which
the U-Net receives as `text_embeds` (ldm.networks.added_conditioning). The refiner has the second encoder only.

`force_zeros_for_empty_prompt` (model_index.json; True for SDXL base): with no negative prompt, the unconditional
branch of classifier-free guidance gets zeros for both embeddings instead of the encoding of "".
`requires_aesthetics_score` (model_index.json; True for the refiner): its U-Net reads an aesthetic score in place of
the target size (pipelines.conditioning). Both are pipeline flags of diffusers' SDXL classes, kept here beside the
encoders they come with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.networks import clip_text
from ldm.networks.text import TextEncoder
from ldm.networks.tokenizer import EOS

SUBFOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class SDXLPromptEncoder(TextEncoder):
    """One of SDXL's text encoders: per-token states of the penultimate layer before the final LayerNorm; skip k (the
    `layer`, or diffusers' SDXL `clip_skip`) reads layer -(k + 2) of the hidden states."""

    def hidden_states(self, input_ids: torch.Tensor, skip: int) -> torch.Tensor:
        """diffusers' SDXL encode_prompt: `hidden_states[-(skip + 2)]`, no final LayerNorm."""
        return self.model(input_ids=input_ids, output_hidden_states=True).hidden_states[-(skip + 2)]

    def pooled(self, prompts: list[str], *, syntax: str = "plain") -> torch.Tensor:
        """The projected pooled embedding `text_embeds` (B, projection_dim) of the prompts' first window: the whole
        prompt when it fits the context length, as diffusers reads it (ldm.networks.prompt_encoder.window_ids)."""
        if not hasattr(self.model, "text_projection"):
            raise TypeError(f"the pooled embedding needs a CLIPTextModelWithProjection, this encoder has a "
                            f"{type(self.model).__name__}")
        ids = self.window_ids(prompts, syntax=syntax)[0][:, 0]  # (B, n)
        return self.model(input_ids=ids.to(self._param.device)).text_embeds  # (B, projection_dim)


class SDXLTextEncoder(nn.Module):
    """SDXL's two prompt encoders (`text_encoder` None: the refiner's second alone): prompts -> (B, n, D1 + D2) and the
    pooled (B, P) of the second."""

    def __init__(self, text_encoder: SDXLPromptEncoder | None, text_encoder_2: SDXLPromptEncoder, *,
                 force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False) -> None:
        super().__init__()
        for name, enc in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if enc is not None and not isinstance(enc, SDXLPromptEncoder):
                raise TypeError(f"{name} must be an SDXLPromptEncoder, got {type(enc).__name__}")
        if not hasattr(text_encoder_2.model, "text_projection"):
            raise TypeError("text_encoder_2 must hold a CLIPTextModelWithProjection (it gives the pooled embedding), "
                            f"got {type(text_encoder_2.model).__name__}")
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.requires_aesthetics_score = bool(requires_aesthetics_score)
        self.train(text_encoder_2.training)

    @property
    def encoders(self) -> list[SDXLPromptEncoder]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizer(self) -> Any:
        return self.encoders[0].tokenizer

    @property
    def hidden_size(self) -> int:
        """The width of the concatenated embedding: the U-Net's cross_attention_dim."""
        return sum(e.hidden_size for e in self.encoders)

    @property
    def pooled_size(self) -> int:
        return int(self.text_encoder_2.model.config.projection_dim)

    @staticmethod
    def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
        if len({tuple(p.shape[:2]) for p in parts}) != 1:
            shapes = [tuple(p.shape) for p in parts]
            raise ValueError(f"SDXL's text encoders gave embeddings of different lengths {shapes} (their tokenizers' "
                             "model_max_length must agree)")
        return torch.cat(parts, dim=-1)  # (B, n, D1 + D2)

    def encode(self, prompts: str | list[str], **options: Any) -> torch.Tensor:
        """(B, n, D1 + D2): each encoder's states (ldm.networks.text.PromptEncoder.encode, `options` to both)."""
        return self._concat([e.encode(prompts, **options) for e in self.encoders])

    def encode_pair(self, prompts: list[str], negatives: list[str], **options: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, c_negative), each encoder's pair encoded alike (PromptEncoder.encode_pair), then concatenated."""
        pairs = [e.encode_pair(prompts, negatives, **options) for e in self.encoders]
        return self._concat([p[0] for p in pairs]), self._concat([p[1] for p in pairs])

    def pooled(self, prompts: list[str], **options: Any) -> torch.Tensor:
        """(B, P): the second encoder's projected pooled embedding (`text_embeds` of the U-Net)."""
        return self.text_encoder_2.pooled(prompts, **options)

    def forward(self, prompts: str | list[str], **options: Any) -> torch.Tensor:
        return self.encode(prompts, **options)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write text_encoder/, tokenizer/ (unless the refiner's), text_encoder_2/ and tokenizer_2/ in diffusers'
        layout."""
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(folder, subfolders=SUBFOLDERS[0])
        self.text_encoder_2.save_pretrained(folder, subfolders=SUBFOLDERS[1])

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, dtype: torch.dtype | None = None, first: bool = True,
                        force_zeros_for_empty_prompt: bool = True, requires_aesthetics_score: bool = False
                        ) -> SDXLTextEncoder:
        """The encoders of a local SDXL pipeline folder (first=False: text_encoder_2/ alone, the refiner's)."""
        folder = Path(folder)
        text_encoder = None
        if first:
            text_encoder = SDXLPromptEncoder.from_pretrained(folder, dtype=dtype, subfolders=SUBFOLDERS[0])
        second = SDXLPromptEncoder.from_pretrained(folder, dtype=dtype, subfolders=SUBFOLDERS[1])
        return cls(text_encoder, second, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                   requires_aesthetics_score=requires_aesthetics_score)

    @classmethod
    def from_config(cls, config: clip_text.CLIPTextConfig | None, config_2: clip_text.CLIPTextConfig, *,
                    seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> SDXLTextEncoder:
        """Seeded random encoders of our configs with the offline tokenizers (the second padding with "!", its model
        with the projection): for tests and tiny models."""
        if not isinstance(config_2, clip_text.CLIPTextConfig):
            raise TypeError(f"config_2 must be an ldm.networks.clip_text.CLIPTextConfig, got {type(config_2).__name__}")
        config_2 = dataclasses.replace(config_2, architectures=["CLIPTextModelWithProjection"])
        first = None if config is None else SDXLPromptEncoder.from_config(config, seed=seed, pad_token=EOS)
        second = SDXLPromptEncoder.from_config(config_2, seed=seed + 1, pad_token="!")
        return cls(first, second, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
