"""DeepCache in the U-Net's forward (ldm.networks.feature_cache): off it is the plain forward bit for bit, a cached call
is the shallow path on the kept deep feature exactly, and the whole schedule equals the DeepCache package's
DeepCacheSDHelper on diffusers' UNet2DConditionModel with the same weights."""

from __future__ import annotations

import types

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.networks.feature_cache import FeatureCache
from ldm.networks.unet import UNet, UNetConfig

# SD's layout (two resnets per block: three skip branches per block, DeepCache's numbering) at three depths, and an
# uneven one (1, 3, 2 resnets per block) for the general numbering.
SD_LIKE = UNetConfig(
    sample_size=8, block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, layers_per_block=2, attention_head_dim=4,
    cross_attention_dim=24, norm_num_groups=8,
)
UNEVEN = UNetConfig(
    sample_size=8, block_out_channels=(16, 48, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D",
                                                                      "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 3, 2),
    attention_head_dim=(2, 3, 4), cross_attention_dim=24, norm_num_groups=8,
)


def _unet(cfg: UNetConfig, seed: int = 0) -> UNet:
    unet = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def _inputs(n: int, batch: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, batch, 4, size, size, generator=g)
    ts = torch.linspace(900, 20, n)
    return xs, ts, torch.randn(batch, 7, 24, generator=g)


def _full_calls(unet: UNet) -> tuple[list[bool], object]:
    """A list that records, per U-Net call, whether the mid block ran (a full call), and the hook's handle."""
    ran: list[bool] = []
    handle = unet.mid_block.register_forward_hook(lambda *a: ran.__setitem__(-1, True))
    pre = unet.register_forward_pre_hook(lambda *a: ran.append(False))
    return ran, (handle, pre)


@pytest.mark.parametrize("cfg, size", [(SD_LIKE, 8), (UNEVEN, 8), (UNEVEN, 6)])  # 6: odd sizes down the path
def test_interval_one_is_the_plain_forward_bit_for_bit(cfg, size):
    unet = _unet(cfg)
    xs, ts, c = _inputs(3, size=size)
    with torch.no_grad():
        plain = [unet(x, t, c) for x, t in zip(xs, ts)]
        for depth in range(unet.cache_branches):
            cache = FeatureCache(interval=1, depth=depth)
            for x, t, ref in zip(xs, ts, plain):
                assert torch.equal(unet(x, t, c, cache=cache), ref)
            assert cache.calls == cache.full_calls == 3


@pytest.mark.parametrize("cfg", [SD_LIKE, UNEVEN])
def test_full_calls_follow_the_uniform_schedule_and_equal_the_plain_forward(cfg):
    unet = _unet(cfg)
    xs, ts, c = _inputs(7)
    ran, handles = _full_calls(unet)
    with torch.no_grad():
        for depth in (0, unet.cache_branches - 1):
            ran.clear()
            cache = FeatureCache(interval=3, depth=depth)
            outs = [unet(x, t, c, cache=cache) for x, t in zip(xs, ts)]
            assert ran == [True, False, False, True, False, False, True]  # calls 0, 3, 6: the first is always full
            assert (cache.calls, cache.full_calls) == (7, 3)
            for i in (0, 3, 6):
                assert torch.equal(outs[i], unet(xs[i], ts[i], c))
            for i in (1, 2, 4, 5):  # a cached call is not the full one, so the comparisons above can fail
                assert (outs[i] - unet(xs[i], ts[i], c)).abs().max() > 1e-4
    for h in handles:
        h.remove()


def _deep_input(unet: UNet, block: int, resnet: int, x, t, c) -> torch.Tensor:
    """The deep feature of a plain forward: the input of up_blocks[block].resnets[resnet] minus its skip channels."""
    seen = []
    module = unet.up_blocks[block].resnets[resnet]
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        unet(x, t, c)
    handle.remove()
    return seen[0][:, : module.conv1.in_channels - _skip_channels(unet, block, resnet)]


def _skip_channels(unet: UNet, block: int, resnet: int) -> int:
    n = len(unet.up_blocks[block].resnets)
    rev = unet.config.block_out_channels[::-1]
    return rev[min(block + 1, len(rev) - 1)] if resnet == n - 1 else rev[block]


def _temb(unet: UNet, t, batch: int) -> torch.Tensor:
    return unet.time_embedding(unet.time_proj(t.reshape(1).expand(batch)))


def test_cached_call_is_the_shallow_path_on_the_kept_feature_exactly():
    """Branch 0 (DeepCache's default) and branch 4 of SD's layout, written out module by module."""
    unet = _unet(SD_LIKE)
    xs, ts, c = _inputs(2)
    x0, t0, x1, t1 = xs[0], ts[0], xs[1], ts[1]

    def out(h: torch.Tensor) -> torch.Tensor:
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))

    with torch.no_grad():
        # branch 0: conv_in, then the last resnet (and its transformer) of the last up block on [deep; conv_in]
        cache = FeatureCache(interval=2, depth=0)
        unet(x0, t0, c, cache=cache)
        got = unet(x1, t1, c, cache=cache)
        last = unet.up_blocks[-1]
        deep = _deep_input(unet, 2, 2, x0, t0, c)
        temb = _temb(unet, t1, 2)
        h = last.resnets[2](torch.cat([deep, unet.conv_in(x1)], 1), temb)
        assert torch.equal(got, out(last.attentions[2](h, c)))

        # branch 4: skips 0 .. 4 (conv_in, down block 0 whole, down block 1's first resnet and transformer), the deep
        # feature into up block 1's resnet 1, its resnet 2 and upsampler, then up block 2 whole
        cache = FeatureCache(interval=2, depth=4)
        unet(x0, t0, c, cache=cache)
        got = unet(x1, t1, c, cache=cache)
        down0, down1, up1, up2 = unet.down_blocks[0], unet.down_blocks[1], unet.up_blocks[1], unet.up_blocks[2]
        s0 = unet.conv_in(x1)
        s1 = down0.attentions[0](down0.resnets[0](s0, temb), c)
        s2 = down0.attentions[1](down0.resnets[1](s1, temb), c)
        s3 = down0.downsamplers[0](s2)
        s4 = down1.attentions[0](down1.resnets[0](s3, temb), c)
        h = up1.attentions[1](up1.resnets[1](torch.cat([_deep_input(unet, 1, 1, x0, t0, c), s4], 1), temb), c)
        h = up1.upsamplers[0](up1.attentions[2](up1.resnets[2](torch.cat([h, s3], 1), temb), c))
        for j, skip in enumerate((s2, s1, s0)):
            h = up2.attentions[j](up2.resnets[j](torch.cat([h, skip], 1), temb), c)
        assert torch.equal(got, out(h))


def test_a_batch_change_runs_in_full_and_never_reuses_another_batchs_feature():
    """The guidance interval switches between the batched [uncond; cond] call (2B) and the conditional one (B)."""
    unet = _unet(SD_LIKE)
    xs, ts, c = _inputs(6, batch=2)
    ran, handles = _full_calls(unet)
    cache = FeatureCache(interval=3, depth=1)
    batches = [1, 2, 2, 2, 1, 1]  # outside the interval, inside it, outside again
    with torch.no_grad():
        outs = [unet(x[-b:], t, c[-b:], cache=cache) for x, t, b in zip(xs, ts, batches)]
        # call 1 and call 4 change the batch: full; call 3 is the schedule's; calls 2 and 5 reuse their batch's feature
        assert ran == [True, True, False, True, True, False]
        for i in (0, 1, 3, 4):
            assert torch.equal(outs[i], unet(xs[i][-batches[i]:], ts[i], c[-batches[i]:]))
        for i, keeper in ((2, 1), (5, 4)):  # the feature kept by the full call with the same batch
            b = batches[i]
            again = FeatureCache(interval=2, depth=1)
            unet(xs[keeper][-b:], ts[keeper], c[-b:], cache=again)
            assert torch.equal(outs[i], unet(xs[i][-b:], ts[i], c[-b:], cache=again))
        # another spatial size is a full call too
        cache = FeatureCache(interval=4, depth=0)
        unet(xs[0], ts[0], c, cache=cache)
        assert torch.equal(unet(xs[1][..., :4, :4], ts[1], c, cache=cache), unet(xs[1][..., :4, :4], ts[1], c))
    for h in handles:
        h.remove()


@pytest.mark.parametrize("interval", [2, 3])
def test_equals_the_deepcache_package_at_every_branch(interval):
    """DeepCacheSDHelper (pip DeepCache 0.1.1) wraps diffusers' blocks and counts the index of each call's timestep in
    the scheduler's list; with one call per timestep that is our call count. Same weights: equal to 1e-5 (observed:
    bit for bit)."""
    helper_cls = pytest.importorskip("DeepCache").DeepCacheSDHelper
    ours = _unet(SD_LIKE)
    theirs = UNet2DConditionModel.from_config(SD_LIKE.to_diffusers()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    xs, ts, c = _inputs(7)
    for depth in range(ours.cache_branches):
        helper = helper_cls(types.SimpleNamespace(unet=theirs, scheduler=types.SimpleNamespace(timesteps=ts)))
        helper.set_params(cache_interval=interval, cache_branch_id=depth)
        helper.enable()
        cache = FeatureCache(interval, depth)
        try:
            with torch.no_grad():
                for x, t in zip(xs, ts):
                    ref = theirs(x, t, encoder_hidden_states=c).sample
                    torch.testing.assert_close(ours(x, t, c, cache=cache), ref, rtol=0, atol=1e-5)
        finally:
            helper.disable()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"cache_interval must be an integer >= 1"):
        FeatureCache(interval=0)
    with pytest.raises(ValueError, match="cache_interval"):
        FeatureCache(interval=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cache_depth must be an integer >= 0"):
        FeatureCache(depth=-1)
    unet = _unet(SD_LIKE)
    assert unet.cache_branches == 9
    xs, ts, c = _inputs(1)
    with pytest.raises(ValueError, match=r"cache_depth must be an integer in \[0, 8\].*9 skip branches\), got 9"):
        unet(xs[0], ts[0], c, cache=FeatureCache(depth=9))
