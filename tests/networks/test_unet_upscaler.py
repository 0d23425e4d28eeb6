"""The x4 upscaler's U-Net features against diffusers' UNet2DConditionModel on identical (seeded, random) weights:
the noise-level class embedding (`num_class_embeds`, `class_labels=`) and `only_cross_attention` (attn1 attends to the
text). Tolerance as tests/networks/test_unet.py: max abs error <= 1e-5 in fp32 on the CPU (observed 0)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock as DBasicTransformerBlock

from ldm.config import ConfigError
from ldm.networks import layers as L
from ldm.networks.unet import UNet, UNetConfig
from tests.networks.test_unet import TOL, make_pair, max_err, pair

# diffusers' own fast-test upscaler U-Net (tests/pipelines/stable_diffusion_2/test_stable_diffusion_upscale.py), with
# smaller norm groups: 7 input channels (4 latent + 3 image), per-block only_cross_attention, 100 noise levels
UPSCALER = UNetConfig(
    sample_size=8, in_channels=7, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False), num_class_embeds=100,
    norm_num_groups=8,
)

# stabilityai/stable-diffusion-x4-upscaler's unet/config.json (its diffusers keys; 473 M parameters)
X4_UPSCALER = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [256, 512, 512, 1024], "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 7, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": 1000, "only_cross_attention": [True, True, True, False], "out_channels": 4,
    "sample_size": 128,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


@pytest.mark.parametrize("cross_only", [False, True])
def test_transformer_block_only_cross_attention_matches_diffusers(cross_only: bool) -> None:
    ours, theirs = pair(L.BasicTransformerBlock(24, 4, 6, cross_attention_dim=10, only_cross_attention=cross_only),
                        DBasicTransformerBlock(24, 4, 6, cross_attention_dim=10, only_cross_attention=cross_only))
    assert ours.attn1.to_k.in_features == (10 if cross_only else 24)  # attn1 reads the context's width
    x, c = torch.randn(2, 9, 24), torch.randn(2, 7, 10)
    with torch.no_grad():
        assert max_err(ours(x, c), theirs(x, encoder_hidden_states=c)) <= TOL
    with pytest.raises(ValueError, match="only_cross_attention needs a cross_attention_dim"):
        L.BasicTransformerBlock(24, 4, 6, only_cross_attention=True)


@pytest.mark.parametrize("variant", ["per_block", "all", "none"])
def test_upscaler_unet_matches_diffusers(variant: str) -> None:
    cross_only = {"per_block": (True, True, False), "all": True, "none": False}[variant]
    cfg = dataclasses.replace(UPSCALER, only_cross_attention=cross_only)
    ours, theirs = make_pair(cfg)  # same keys in the same order (class_embedding after time_embedding), same shapes
    assert ours.class_embedding.weight.shape == (100, 128)
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)
    t, labels = torch.tensor([3, 700]), torch.tensor([20, 99])
    for hw in [(8, 8), (7, 5)] if variant == "per_block" else [(8, 8)]:  # (7, 5): the exact-size upsampling path
        x = torch.randn(2, 7, *hw, generator=g)
        with torch.no_grad():
            y = ours(x, t, c, class_labels=labels)
            assert max_err(y, theirs(x, t, c, class_labels=labels)) <= TOL
            # the labels matter by far more than the tolerance, so the comparison can fail
            assert max_err(y, ours(x, t, c, class_labels=torch.tensor([0, 0]))) > 100 * TOL
    # a scalar label or a (1,) tensor is broadcast over the batch, as diffusers does for its timestep
    with torch.no_grad():
        one = ours(x, t, c, class_labels=torch.tensor(20))
        assert torch.equal(one, ours(x, t, c, class_labels=torch.tensor([20, 20])))
        assert torch.equal(one, ours(x, t, c, class_labels=torch.tensor([20])))


def test_x4_upscaler_config_builds_diffusers_layout() -> None:
    """The released upscaler's config reads into ours and builds diffusers' keys and shapes (on the meta device)."""
    cfg = UNetConfig.from_diffusers(X4_UPSCALER)
    assert cfg.cross_only == (True, True, True, False) and cfg.num_class_embeds == 1000
    with torch.device("meta"):
        ours, theirs = UNet(cfg), UNet2DConditionModel.from_config(cfg.to_diffusers())
    our_sd, their_sd = ours.state_dict(), theirs.state_dict()
    assert list(our_sd) == list(their_sd)
    assert all(our_sd[k].shape == their_sd[k].shape for k in our_sd)
    assert our_sd["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight"].shape == (512, 1024)
    assert our_sd["up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"].shape == (1024, 1024)  # self
    assert UNetConfig.from_diffusers({**X4_UPSCALER, **cfg.to_diffusers()}) == cfg  # round trip


def test_class_label_errors_name_the_problem() -> None:
    unet = UNet(UPSCALER).eval()
    x, c, t = torch.randn(2, 7, 8, 8), torch.randn(2, 3, 32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"num_class_embeds=100\): pass class_labels"):
        unet(x, t, c)
    with pytest.raises(ValueError, match="class_labels must be integers"):
        unet(x, t, c, class_labels=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 99\]"):
        unet(x, t, c, class_labels=torch.tensor([5, 100]))
    with pytest.raises(ValueError, match=r"scalar or of shape \(2,\)"):
        unet(x, t, c, class_labels=torch.tensor([1, 2, 3]))
    plain = UNet(dataclasses.replace(UPSCALER, num_class_embeds=None, in_channels=4)).eval()
    with pytest.raises(ValueError, match="has none"):
        plain(torch.randn(2, 4, 8, 8), t, c, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="only_cross_attention has 2 entries but block_out_channels has 3"):
        dataclasses.replace(UPSCALER, only_cross_attention=(True, False))
    with pytest.raises(ValueError, match="num_class_embeds must be positive"):
        dataclasses.replace(UPSCALER, num_class_embeds=0)
    with pytest.raises((ValueError, ConfigError), match="class_embed_type"):
        UNetConfig.from_diffusers({**X4_UPSCALER, "class_embed_type": "timestep"})
