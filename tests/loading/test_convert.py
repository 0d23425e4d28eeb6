"""The CompVis <-> ours key maps are checked against diffusers' own single-file converters as the reference."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

from ldm.loading.convert import (
    UNET_PREFIX,
    VAE_PREFIX,
    split_single_file,
    unet_from_compvis,
    unet_prefix_map,
    unet_to_compvis,
    vae_from_compvis,
    vae_prefix_map,
    vae_to_compvis,
)
from ldm.io import WeightsError

UNET_CONFIGS = [
    dict(block_out_channels=(32, 64, 64), layers_per_block=2,
         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    dict(block_out_channels=(32, 64), layers_per_block=1,
         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
]  # fmt: skip


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k].reshape(b[k].shape), b[k]) for k in b)


@pytest.mark.parametrize("cfg", UNET_CONFIGS)
def test_unet_map_agrees_with_diffusers_converter(cfg):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, **cfg)
    ours = unet.state_dict()
    pairs = unet_prefix_map(cfg["block_out_channels"], cfg["layers_per_block"], cfg["down_block_types"],
                            cfg["up_block_types"])
    compvis = unet_to_compvis(ours, pairs)
    assert any(k.startswith("input_blocks.") for k in compvis) and not any(k.startswith("down_blocks") for k in compvis)
    reference = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in compvis.items()}, dict(unet.config))
    assert _same(reference, ours)
    assert _same(unet_from_compvis(compvis, pairs), ours)


def test_unet_map_handles_uneven_layers_per_block():
    pairs = unet_prefix_map((32, 64, 64), (1, 2, 3), ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                            ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)
    ours = [a for a, _ in pairs]
    theirs = [b for _, b in pairs]
    assert len(set(ours)) == len(ours) and len(set(theirs)) == len(theirs)  # a bijection
    assert ("down_blocks.2.resnets.2", "input_blocks.8.0") in pairs  # 1 + (1+1) + (2+1) + 3 - 1 = 8
    assert ("up_blocks.0.resnets.3", "output_blocks.3.0") in pairs  # up block 0 mirrors down block 2: 3 + 1 layers
    assert ("up_blocks.0.upsamplers.0.conv", "output_blocks.3.1.conv") in pairs


@pytest.mark.parametrize("blocks, layers", [((32, 64), 2), ((16, 32, 32), 1)])
def test_vae_map_agrees_with_diffusers_converter(blocks, layers):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), norm_num_groups=8,
                        layers_per_block=layers, latent_channels=4)
    ours = vae.state_dict()
    pairs = vae_prefix_map(blocks, layers)
    compvis = vae_to_compvis(ours, pairs)
    assert compvis["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions in the CompVis layout
    reference = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in compvis.items()}, dict(vae.config))
    assert _same(reference, ours)
    assert _same(vae_from_compvis(compvis, pairs), ours)


def test_split_single_file_rejects_non_sd_checkpoints():
    with pytest.raises(WeightsError, match="no key starts with 'model.diffusion_model.'"):
        split_single_file({"foo.weight": torch.zeros(1)})
    parts = split_single_file({UNET_PREFIX + "a": torch.zeros(1), VAE_PREFIX + "b": torch.ones(1)})
    assert list(parts["unet"]) == ["a"] and list(parts["vae"]) == ["b"]
