"""benchmarks/guidance.py's helpers: the pipeline call of each guidance kind, the colour share on clean renders (the
detector is exact there), the constant variance head (v = -1 / +1 read as beta~_t / beta_t), and the ELBO table (the
memoised network runs once per timestep; a constant head's "learned" bound equals the fixed one of the same
variance)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from benchmarks import guidance as G
from ldm.config import BUNDLED_CONFIGS, load_config
from ldm.diffusion.process import vlb_terms
from ldm.diffusion.schedule import NoiseSchedule
from ldm.networks.unet import UNet, UNetConfig
from ldm.shapes.dataset import dataset_item


def test_each_guidance_kind_maps_to_its_pipeline_options():
    prompts, labels = ["a red circle", "a blue star"], ["red", "blue"]
    assert G.GuidanceRow("cfg", 5.0).call(prompts, labels) == (prompts, 5.0, {})
    assert G.GuidanceRow("clip", 3.0).call(prompts, labels) == (
        prompts, 1.0, {"clip_guidance_scale": 3.0, "noisy_clip": "default"})
    assert G.GuidanceRow("cfg+clip", 3.0).call(prompts, labels)[1] == G.CFG_WITH_CLIP
    assert G.GuidanceRow("clip-uncond", 30.0).call(prompts, labels) == (
        ["", ""], 1.0, {"clip_guidance_scale": 30.0, "noisy_clip": "default", "clip_prompt": prompts})
    assert G.GuidanceRow("classifier", 8.0).call(prompts, labels) == (
        ["", ""], 1.0, {"classifier": "default", "label": labels, "classifier_scale": 8.0})  # unconditional
    with pytest.raises(ValueError, match="unknown guidance kind"):
        G.GuidanceRow("clsf", 1.0).call(prompts, labels)
    assert {r.kind for r in G.guidance_rows(False)} == {"cfg", "clip", "cfg+clip", "clip-uncond", "classifier"}


def test_prompt_colour_and_colour_share_on_clean_renders():
    assert G.prompt_colour("a red circle above a blue square") == "red"
    with pytest.raises(ValueError, match="states no colour"):
        G.prompt_colour("a circle")
    items = [dataset_item(0, "train", i, 64, layouts={"single": 1.0}) for i in range(6)]
    images = np.stack([np.asarray(im, dtype=np.float64) / 255 for im, _, _ in items])
    colours = [scene.objects[0].color for _, _, scene in items]
    assert G.colour_share(colours, images) == 1.0
    wrong = [{"red": "blue"}.get(c, "red") for c in colours]  # every label changed
    assert G.colour_share(wrong, images) == 0.0
    with pytest.raises(ValueError, match="labels for"):
        G.colour_share(colours[:2], images)


def _tiny_wide_unet(seed: int = 0) -> UNet:
    config = load_config(UNetConfig, BUNDLED_CONFIGS / "unet-tiny.yaml")
    torch.manual_seed(seed)
    return UNet(dataclasses.replace(config, out_channels=8)).eval()


def test_constant_head_keeps_the_prediction_and_sets_v():
    unet = _tiny_wide_unet()
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([3, 700]), torch.randn(2, 5, 32)
    fixed = G.constant_head(unet, -1.0)
    with torch.no_grad():
        out, out_fixed = unet(x, t, encoder_hidden_states=c), fixed(x, t, encoder_hidden_states=c)
    assert torch.equal(out_fixed[:, :4], out[:, :4])
    assert torch.equal(out_fixed[:, 4:], torch.full_like(out[:, 4:], -1.0))
    assert not torch.equal(unet.conv_out.bias[4:], fixed.conv_out.bias[4:])  # a copy: the original is untouched
    with pytest.raises(ValueError, match="no variance"):
        G.constant_head(UNet(load_config(UNetConfig, BUNDLED_CONFIGS / "unet-tiny.yaml")), 1.0)


def test_memoised_outputs_run_the_network_once_per_timestep():
    ac = NoiseSchedule(num_train_timesteps=6, beta_start=0.01, beta_end=0.3).alphas_cumprod().double()
    calls = []

    def net(x, t):
        calls.append(1)
        return torch.cat([0.5 * x, torch.zeros_like(x)], 1)

    memo, x0 = G.SameDrawOutputs(net), torch.randn(3, 2, dtype=torch.float64)

    def bound(seed):
        return vlb_terms(memo, x0, ac, variance="learned_range", decoder="continuous",
                         generator=torch.Generator().manual_seed(seed))

    a, b = bound(0), bound(0)
    assert len(calls) == memo.calls == 6 and torch.equal(a.terms, b.terms)
    bound(1)
    assert memo.calls == 12  # other draws: run again, never a stale output


@pytest.mark.parametrize("v,fixed", [(-1.0, "fixed beta~_t"), (1.0, "fixed beta_t")])
def test_a_constant_head_bounds_as_the_fixed_variance_it_names(v, fixed):
    """elbo_table on a tiny U-Net (20 timesteps): the head held at v = -1 (+1) gives the learned_range column the
    fixed_small (fixed_large) column's bound (1e-9 relative: eq. 15's end points), from one network pass."""
    unet = G.constant_head(_tiny_wide_unet(), v)
    ac = NoiseSchedule(num_train_timesteps=20, prediction_type="v_prediction").alphas_cumprod().double()
    z0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    table = G.elbo_table(unet, ac, z0, torch.randn(2, 5, 32), "v_prediction")
    assert table["network_calls"]["n"] == 20
    for key in ("bpd", "kl", "decoder", "prior"):
        assert table["learned"][key] == pytest.approx(table[fixed][key], rel=1e-9, abs=1e-12)
    assert table["fixed beta~_t"]["bpd"] != table["fixed beta_t"]["bpd"]


def test_fewer_steps_verdict_finds_where_a_fixed_variance_is_as_good():
    rows = [{"variance": v, "steps": s, "fd": f, "all_correct": 0.5} for v, s, f in
            [("learned", 10, 1.0), ("fixed beta~_t", 10, 2.0), ("fixed beta_t", 10, 3.0), ("fixed beta~_t", 25, 0.8),
             ("fixed beta_t", 25, 1.2), ("learned", 25, 1.5)]]
    assert G.fewer_steps_verdict(rows) == (
        "holds at 1 of 2 step counts. learned at 10 steps (FD 1.000): as good as fixed beta_t at more than 25 steps, "
        "fixed beta~_t at 25 steps: fewer steps; learned at 25 steps (FD 1.500): as good as fixed beta_t at 25 steps, "
        "fixed beta~_t at 25 steps: no saving")
    assert G.fewer_steps_verdict(rows, tolerance=2.5).startswith("holds at 0 of 2")  # everything within the noise
