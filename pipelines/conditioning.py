"""SDXL's added conditioning in a generation call (Podell et al. 2023, sec. 2.2): the pooled text embedding and the
micro-conditioning time ids (original size, crop top-left, target size), beside the per-token embeddings the Pipeline
encodes (Pipeline._guided hands its cond / uncond dicts to `AddedConditions.extend`).

Options, with diffusers' StableDiffusionXLPipeline defaults: `original_size` and `target_size` (height, width) default
to the image's size, `crops_coords_top_left` (top, left) to (0, 0). Each `negative_*` (the unconditional branch's)
defaults to its positive counterpart: with none given this is diffusers' text-to-image and image-to-image; diffusers'
text-to-image reads the negative ones only when both negative sizes are given (then its negative crop defaults to
(0, 0)), and its image-to-image never reads negative_crops_coords_top_left: pass all three to match both.
With no negative prompt and the folder's `force_zeros_for_empty_prompt` (SDXL base), the unconditional branch gets
zero embeddings, as diffusers. The refiner (`requires_aesthetics_score`) reads `aesthetic_score` (default 6.0) and
`negative_aesthetic_score` (2.5) in place of the target sizes, as diffusers' StableDiffusionXLImg2ImgPipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ldm.networks.text_sdxl import SDXLTextEncoder
from ldm.networks.unet import UNet
from pipelines.call_options import OptionError, check_float, check_int

Pair = tuple[int, int]
MAX_ID = 65504  # the largest finite float16: the time ids enter the U-Net in its dtype, as diffusers'


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning options of one call, checked (`check_size_conditioning`); None: the default."""

    original_size: Pair | None = None
    crops_coords_top_left: Pair = (0, 0)
    target_size: Pair | None = None
    negative_original_size: Pair | None = None
    negative_crops_coords_top_left: Pair | None = None
    negative_target_size: Pair | None = None
    aesthetic_score: float = 6.0  # the refiner's, in place of the target size
    negative_aesthetic_score: float = 2.5

    def given(self) -> list[str]:
        """The options set away from their defaults."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]

    def time_ids(self, height: int, width: int, aesthetic: bool = False
                 ) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(positive, negative) time ids of an image of height x width: (original h, w, crop top, left, target h, w),
        or with `aesthetic` (the refiner) (original h, w, crop top, left, aesthetic score)."""
        original, target = self.original_size or (height, width), self.target_size or (height, width)
        crops = self.negative_crops_coords_top_left or self.crops_coords_top_left
        last = ((self.aesthetic_score,), (self.negative_aesthetic_score,)) if aesthetic else \
            (target, self.negative_target_size or target)
        positive = (*original, *self.crops_coords_top_left, *last[0])
        negative = (*(self.negative_original_size or original), *crops, *last[1])
        return positive, negative


def _pair(option: str, value: Any, low: int) -> Pair | None:
    if value is None:
        return None
    valid = f"a pair of integers in [{low}, {MAX_ID}], (height, width) or (top, left)"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise OptionError(option, value, valid)
    try:
        return check_int(option, value[0], low, MAX_ID), check_int(option, value[1], low, MAX_ID)
    except OptionError:
        raise OptionError(option, tuple(value), valid) from None


def check_size_conditioning(
    original_size: Pair | None = None, crops_coords_top_left: Pair = (0, 0), target_size: Pair | None = None,
    negative_original_size: Pair | None = None, negative_crops_coords_top_left: Pair | None = None,
    negative_target_size: Pair | None = None, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
) -> SizeConditioning:
    """The options as a SizeConditioning: sizes pairs of integers >= 1, crops >= 0 (both at most MAX_ID), aesthetic
    scores in [0, 10] (the LAION aesthetic predictor's scale); an OptionError names a bad one."""
    return SizeConditioning(
        _pair("original_size", original_size, 1), _pair("crops_coords_top_left", crops_coords_top_left, 0) or (0, 0),
        _pair("target_size", target_size, 1), _pair("negative_original_size", negative_original_size, 1),
        _pair("negative_crops_coords_top_left", negative_crops_coords_top_left, 0),
        _pair("negative_target_size", negative_target_size, 1), check_float("aesthetic_score", aesthetic_score, 0, 10),
        check_float("negative_aesthetic_score", negative_aesthetic_score, 0, 10))


@dataclass
class AddedConditions:
    """What an SDXL U-Net takes besides the per-token embeddings, for one call: `extend` adds `text_embeds` and
    `time_ids` to the cond / uncond dicts of the denoiser, and zeros the unconditional embeddings when asked."""

    text_encoder: SDXLTextEncoder
    time_ids: tuple[float, ...]
    negative_time_ids: tuple[float, ...]
    zero_negative: bool  # no negative prompt and force_zeros_for_empty_prompt

    def extend(self, cond: dict[str, torch.Tensor], prompts: list[str], uncond: dict[str, torch.Tensor] | None = None,
               negatives: list[str] | None = None, *, syntax: str = "plain", **text_options: Any) -> None:
        """Add text_embeds (B, P) and time_ids (B, 6) to `cond` (and `uncond`), in place. The pooled embedding reads
        the prompt in its `syntax` (emphasis marks are not text) and, as diffusers', the last layer whatever the
        other `text_options` (clip_skip) say."""
        c = cond["encoder_hidden_states"]

        def ids(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=c.device).expand(len(prompts), -1)  # (B, 6 or 5)

        cond.update(text_embeds=self.text_encoder.pooled(prompts, syntax=syntax).to(c.device, c.dtype),
                    time_ids=ids(self.time_ids))
        if uncond is None:
            return
        if self.zero_negative:
            uncond["encoder_hidden_states"] = torch.zeros_like(uncond["encoder_hidden_states"])
            pooled = torch.zeros_like(cond["text_embeds"])
        else:
            assert negatives is not None
            pooled = self.text_encoder.pooled(negatives, syntax=syntax).to(c.device, c.dtype)
        uncond.update(text_embeds=pooled, time_ids=ids(self.negative_time_ids))


def added_conditions(unet: UNet, text_encoder: Any, sizes: SizeConditioning, height: int, width: int,
                     negative_prompt_given: bool) -> AddedConditions | None:
    """The added conditions of a call making height x width images (None for a U-Net that takes none, which then
    refuses the SDXL options, naming the first given)."""
    if unet.config.addition_embed_type != "text_time":
        if sizes.given():
            name = sizes.given()[0]
            raise OptionError(name, getattr(sizes, name), text="{option} is SDXL's micro-conditioning; this model's "
                              "U-Net takes none (its addition_embed_type is not 'text_time')")
        return None
    assert isinstance(text_encoder, SDXLTextEncoder)  # ldm.loading.components.check_components
    aesthetic = text_encoder.requires_aesthetics_score
    unread = ("target_size", "negative_target_size") if aesthetic else ("aesthetic_score", "negative_aesthetic_score")
    for name in (n for n in sizes.given() if n in unread):
        why = ("the SDXL refiner (requires_aesthetics_score) takes aesthetic_score in place of the target size"
               if aesthetic else "aesthetic scores are the SDXL refiner's (requires_aesthetics_score), not this model's")
        raise OptionError(name, getattr(sizes, name), text="{option} is not read by this model: " + why)
    positive, negative = sizes.time_ids(height, width, aesthetic)
    zero = text_encoder.force_zeros_for_empty_prompt and not negative_prompt_given
    return AddedConditions(text_encoder, positive, negative, zero)
