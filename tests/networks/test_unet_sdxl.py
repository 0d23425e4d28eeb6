"""SDXL's U-Net (addition_embed_type "text_time", per-block transformer depth, a first block without attention) against
diffusers' UNet2DConditionModel of the same config on identical seeded random weights, fp32 on the CPU.

Tolerance: max abs error <= 1e-5 (as tests/networks/test_unet.py; observed ~1e-7)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.networks.added_conditioning import NUM_TIME_IDS
from ldm.networks.unet import UNet, UNetConfig
from tests.networks.test_unet import max_err, pair

TOL = 1e-5

# SDXL's block structure at reduced width: no attention in the first block, transformer depth growing with depth,
# linear projections, heads per block, pooled width 16 + 6 time ids x 8 features
SDXL_TINY = UNetConfig(
    sample_size=8, block_out_channels=(16, 32, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), layers_per_block=2,
    transformer_layers_per_block=(1, 2, 3), attention_head_dim=(2, 4, 8), use_linear_projection=True,
    cross_attention_dim=32, norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + NUM_TIME_IDS * 8,
)


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    context = torch.randn(batch, 5, 32, generator=g)
    pooled = torch.randn(batch, 16, generator=g)
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0], [32.0, 32.0, 4.0, 0.0, 40.0, 24.0]])[:batch]
    return sample, context, pooled, time_ids


@pytest.fixture(scope="module")
def unets():
    theirs = UNet2DConditionModel.from_config(SDXL_TINY.to_diffusers())
    return pair(UNet(SDXL_TINY), theirs)


def test_sdxl_unet_matches_diffusers(unets) -> None:
    ours, theirs = unets
    sample, context, pooled, time_ids = _inputs()
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ref = theirs(sample, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(sample, t, context, text_embeds=pooled, time_ids=time_ids)
    assert max_err(got, ref) <= TOL
    # the added conditions matter: other time ids give another output
    with torch.no_grad():
        other = ours(sample, t, context, text_embeds=pooled, time_ids=time_ids.flip(0))
    assert (other - got).abs().max() > 1e-3


def test_sdxl_config_round_trips_through_diffusers(unets) -> None:
    _, theirs = unets
    assert UNetConfig.from_diffusers(dict(theirs.config)) == SDXL_TINY
    assert set(UNet(SDXL_TINY).state_dict()) == set(theirs.state_dict())


def test_sdxl_unet_names_missing_or_misshaped_conditions(unets) -> None:
    ours, _ = unets
    sample, context, pooled, time_ids = _inputs()
    with pytest.raises(ValueError, match="pass text_embeds \\(B, P\\) and time_ids \\(B, k\\) with P \\+ k x 8 = "
                                         "64 \\(SDXL: P = 16 with k = 6\\)"):
        ours(sample, 1, context, time_ids=time_ids)
    with pytest.raises(ValueError, match="time_ids \\(2, 5\\) do not fit this U-Net"):
        ours(sample, 1, context, text_embeds=pooled, time_ids=time_ids[:, :5])
    with pytest.raises(ValueError, match="time_ids must be \\(B, ...\\) with B = 2, got shape \\(1, 6\\)"):
        ours(sample, 1, context, text_embeds=pooled, time_ids=time_ids[:1])
    plain = UNet(dataclasses.replace(SDXL_TINY, addition_embed_type=None, addition_time_embed_dim=None,
                                     projection_class_embeddings_input_dim=None))
    with pytest.raises(ValueError, match="addition_embed_type 'text_time'"):
        plain(sample, 1, context, text_embeds=pooled, time_ids=time_ids)


@pytest.mark.parametrize("change, message", [
    ({"addition_embed_type": "text"}, "addition_embed_type 'text' is not supported"),
    ({"addition_time_embed_dim": None}, "needs addition_time_embed_dim"),
    ({"projection_class_embeddings_input_dim": 48}, "leaves no room for the pooled text embedding"),
])
def test_sdxl_config_errors_name_the_key(change, message) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SDXL_TINY, **change)
