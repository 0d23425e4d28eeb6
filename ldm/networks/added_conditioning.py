"""SDXL's added conditioning of the U-Net (Podell et al. 2023, sec. 2.2; diffusers' addition_embed_type="text_time").

The pooled text embedding (B, P) and the six micro-conditioning numbers per image, time_ids (B, 6) = (original height,
original width, crop top, crop left, target height, target width; the refiner: five, an aesthetic score in place of
the target size), each embedded with the sinusoidal Fourier features
of the timestep (`addition_time_embed_dim` channels each), are concatenated to (B, P + 6 * addition_time_embed_dim) =
(B, projection_class_embeddings_input_dim) and mapped by an MLP (`add_embedding`, diffusers' TimestepEmbedding) to the
time-embedding width; the U-Net adds the result to its timestep embedding. The modules keep diffusers' names on the
U-Net (`add_time_proj`, no weights; `add_embedding.linear_1`, `.linear_2`), so the weights load by name.
"""

from __future__ import annotations

import torch

from ldm.networks.layers import TimestepEmbedding, Timesteps

ADDITION_EMBED_TYPES = (None, "text_time")
NUM_TIME_IDS = 6  # original (h, w), crop top-left (top, left), target (h, w)


def check_text_time_config(addition_embed_type: str | None, time_dim: int | None, input_dim: int | None) -> None:
    """A config's added-embedding keys, checked: "text_time" needs both widths positive, and its input width must leave
    room for the pooled text embedding after the 6 time ids' features. ValueError naming the key."""
    if addition_embed_type not in ADDITION_EMBED_TYPES:
        raise ValueError(f"addition_embed_type {addition_embed_type!r} is not supported; valid: "
                         f"{list(ADDITION_EMBED_TYPES)}")
    if addition_embed_type is None:
        return
    for name, value in (("addition_time_embed_dim", time_dim), ("projection_class_embeddings_input_dim", input_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"addition_embed_type 'text_time' needs {name} a positive integer, got {value!r}")
    assert time_dim is not None and input_dim is not None
    if input_dim <= NUM_TIME_IDS * time_dim:
        raise ValueError(f"projection_class_embeddings_input_dim {input_dim} leaves no room for the pooled text "
                         f"embedding after {NUM_TIME_IDS} time ids x addition_time_embed_dim {time_dim}")


def text_time_modules(time_dim: int, input_dim: int, temb_dim: int, flip_sin_to_cos: bool, freq_shift: float
                      ) -> tuple[Timesteps, TimestepEmbedding]:
    """(add_time_proj, add_embedding) as diffusers builds them for addition_embed_type="text_time"."""
    return Timesteps(time_dim, flip_sin_to_cos, freq_shift), TimestepEmbedding(input_dim, temb_dim)


def text_time_embedding(time_proj: Timesteps, embedding: TimestepEmbedding, text_embeds: torch.Tensor | None,
                        time_ids: torch.Tensor | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """add_embedding([text_embeds, Fourier(time_ids)]) (B, temb): the term SDXL adds to the timestep embedding.
    text_embeds (B, P) and time_ids (B, k) with P + k * addition_time_embed_dim = projection_class_embeddings_input_dim
    (SDXL: k = 6; its refiner: k = 5, the aesthetic score in place of the target size); a missing or mis-shaped
    input is a ValueError naming it and the widths the U-Net's config asks for."""
    width, per_id = embedding.linear_1.in_features, time_proj.num_channels
    want = (f"text_embeds (B, P) and time_ids (B, k) with P + k x {per_id} = {width} (SDXL: P = "
            f"{width - NUM_TIME_IDS * per_id} with k = {NUM_TIME_IDS})")
    if text_embeds is None or time_ids is None:
        raise ValueError(f"this U-Net has addition_embed_type 'text_time': pass {want}")
    for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
        if value.ndim != 2 or value.shape[0] != batch:
            raise ValueError(f"{name} must be (B, ...) with B = {batch}, got shape {tuple(value.shape)}")
    if text_embeds.shape[1] + time_ids.shape[1] * per_id != width:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} do not fit "
                         f"this U-Net: it takes {want}")
    time_embeds = time_proj(time_ids.flatten()).reshape(batch, -1)  # (B, k * addition_time_embed_dim), float32
    return embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))  # (B, temb)
