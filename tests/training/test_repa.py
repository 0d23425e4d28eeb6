"""REPA (ldm.training.repa): the alignment loss against closed forms, the hooked block, the CLIP patch features against
open_clip, and training with it: the loss it adds, the projector checkpointed and resumed bit for bit, never exported."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ldm.training.checkpoint import list_checkpoints
from ldm.training.clip import build_clip, save_clip
from ldm.config import load_config
from ldm.io import load_state_dict
from ldm.training.repa import PatchFeatures, Projector, alignment_loss, block_output, captured, output_channels
from ldm.training.unet import train
from ldm.training.config import AlignConfig
from ldm.networks.unet import UNet, UNetConfig
from tests._helpers import ROOT, STEPS, tiny_config
from tests._helpers import TINY_CLIP
from tests.training.test_train import assert_same_checkpoint

BLOCK = "down_blocks.0.attentions.0"  # ldm/configs/unet-tiny.yaml: cross-attention at the 4 x 4 latent grid


def test_alignment_loss_is_minus_the_mean_cosine_similarity():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 8, 2, 2, generator=g)
    assert torch.allclose(alignment_loss(h, h), torch.full((3,), -1.0), atol=1e-6)  # aligned: -1
    assert torch.allclose(alignment_loss(h, -2.5 * h), torch.full((3,), 1.0), atol=1e-6)  # opposed, any scale: +1
    a, b = torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1, 1)
    a[0, 0], b[0, 1] = 1.0, 3.0
    assert torch.allclose(alignment_loss(a, b), torch.zeros(1))  # orthogonal: 0
    # the loss per sample is the mean over positions of -cos, computed here by hand
    y = torch.randn(3, 8, 2, 2, generator=g)
    by_hand = -torch.stack([torch.stack([F.cosine_similarity(h[i, :, r, c], y[i, :, r, c], dim=0)
                                         for r in range(2) for c in range(2)]).mean() for i in range(3)])
    assert torch.allclose(alignment_loss(h, y), by_hand, atol=1e-6)


def test_alignment_loss_pools_the_target_grid_to_the_blocks():
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(2, 4, 2, 2, generator=g)
    fine = coarse.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # each 2 x 2 cell constant
    fine = fine + 0.3 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2)  # zero mean within each cell
    assert torch.allclose(alignment_loss(coarse, fine), torch.full((2,), -1.0), atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        alignment_loss(torch.zeros(2, 4, 3, 3), fine)
    with pytest.raises(ValueError, match="batch or feature width"):
        alignment_loss(torch.zeros(2, 5, 2, 2), fine)


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(load_config(UNetConfig, ROOT / "ldm/configs/unet-tiny.yaml")).eval()


def test_the_hooked_block_gives_its_feature_map_and_is_released():
    unet = tiny_unet()
    block = block_output(unet, BLOCK)
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad(), captured(block) as seen:
        out = unet(x, t, encoder_hidden_states=c)
    assert seen[0].shape == (2, 32, 4, 4)
    assert not block._forward_hooks  # removed on exit
    with torch.no_grad():
        assert torch.equal(unet(x, t, encoder_hidden_states=c), out)  # the hook changed nothing
    assert output_channels(block_output(unet, "mid_block"), lambda: unet(x, t, encoder_hidden_states=c)) == 64
    with pytest.raises(KeyError, match="down_blocks.1.attentions.0"):
        block_output(unet, "down_blocks.1.attentions.0")  # DownBlock2D: no attentions
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        output_channels(block_output(unet, "time_embedding"), lambda: unet(x, t, encoder_hidden_states=c))


def test_patch_features_are_open_clips_tokens_on_the_patch_grid():
    clip = build_clip(TINY_CLIP, seed=5).eval()
    features = PatchFeatures(clip)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    got = features(x)
    assert got.shape == (3, 32, 4, 4) and features.width == 32
    clip.visual.output_tokens = True
    with torch.no_grad():
        _, tokens = clip.visual(x)  # (3, 16, 32), row-major patches
    assert torch.equal(got[:, :, 1, 2], tokens[:, 1 * 4 + 2])
    clip.visual.output_tokens = False
    assert torch.equal(got, features(x)) and not clip.visual.output_tokens


def test_projector_maps_each_position_alone():
    torch.manual_seed(0)
    proj = Projector(6, 5, hidden=7)
    h = torch.randn(2, 6, 3, 3)
    out = proj(h)
    assert out.shape == (2, 5, 3, 3)
    assert torch.allclose(out[:, :, 1, 2], proj(h[:, :, 1:2, 2:3])[:, :, 0, 0], atol=1e-6)


def test_align_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="align.encoder"):
        AlignConfig(weight=0.5)
    with pytest.raises(ValueError, match="align.weight"):
        AlignConfig(weight=-1.0, encoder="x")


# ------------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clip") / "clip"
    save_clip(build_clip(TINY_CLIP, seed=6).eval(), TINY_CLIP, folder)
    return folder


def align_overrides(clip: Path, weight: float = 0.5) -> list[str]:
    return [f"objective.align.weight={weight}", f"objective.align.encoder={clip}", f"objective.align.block={BLOCK}",
            "objective.align.hidden=16", "run.cache_latents=true"]


def last_row(run: Path) -> dict[str, str]:
    with open(run / "losses.csv") as f:
        return list(csv.DictReader(f))[-1]


@pytest.mark.slow
def test_training_with_alignment_checkpoints_the_projector_resumes_bitwise_and_exports_without_it(
        shapes, clip_folder, tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(shapes, straight, *align_overrides(clip_folder)))
    ckpt = list_checkpoints(straight / "checkpoints")[-1][1]
    assert (ckpt / "projector.safetensors").is_file() and not (ckpt / "projector.ema.safetensors").exists()
    row = last_row(straight)
    # the logged loss is the diffusion loss plus 0.5 L_REPA, and L_REPA is a mean of -cos: in [-1, 1]
    assert -1.0 <= float(row["align"]) <= 1.0
    assert float(row["loss"]) != pytest.approx(float(row["diffusion"]))
    # resumed from its step-2 checkpoint: the same weights, projector and its optimizer included
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints/step-00000002", resumed / "checkpoints/step-00000002")
    train(tiny_config(shapes, resumed, *align_overrides(clip_folder), "run.resume=latest"))
    last = list_checkpoints(resumed / "checkpoints")[-1][1]
    assert_same_checkpoint(ckpt, last, parts=("unet",))
    a, b = load_state_dict(ckpt / "projector.safetensors"), load_state_dict(last / "projector.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the U-Net learned something else than without the alignment term
    plain = tmp_path / "plain"
    train(tiny_config(shapes, plain, "run.cache_latents=true", f"run.max_steps={STEPS}"))
    u = load_state_dict(list_checkpoints(plain / "checkpoints")[-1][1] / "unet.safetensors")
    v = load_state_dict(ckpt / "unet.safetensors")
    assert any(not torch.equal(u[k], v[k]) for k in u)
    # the export is the U-Net's (EMA) pipeline folder: the projector is training-only
    from ldm.training.export import export

    exported = export(ckpt, tmp_path / "exported")
    assert (exported / "unet").is_dir() and not [f for f in exported.rglob("*") if "projector" in f.name]
    # a run without the projector cannot resume this checkpoint: the error names the parts
    with pytest.raises(Exception, match="projector"):
        train(tiny_config(shapes, straight, "run.cache_latents=true", "run.resume=latest", "run.max_steps=8"))


def test_alignment_with_an_unknown_block_stops_before_training(shapes, clip_folder, tmp_path):
    with pytest.raises(KeyError, match="down_blocks.7"):
        train(tiny_config(shapes, tmp_path / "run", *align_overrides(clip_folder), "objective.align.block=down_blocks.7"))
    assert not (tmp_path / "run" / "checkpoints").exists()
