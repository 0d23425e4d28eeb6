"""SDXL pipeline folders: the two text encoders load and encode as diffusers' StableDiffusionXLPipeline.encode_prompt
(exactly: max abs difference 0 expected, checked to 1e-6 in fp32), force_zeros_for_empty_prompt is read and written,
and parts that do not fit are named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from ldm.loading.components import IncompatibleComponentsError, check_components, save_pipeline
from ldm.loading.sources import load_components
from pipelines.tiny import tiny_components
from tests.pipelines._sdxl import write_sdxl_folder

PROMPTS = ["a red circle above a blue square", ""]
LONG = " ".join(["a small red circle"] * 25)  # 100 content tokens: two windows


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl_folder"))


@pytest.fixture(scope="module")
def loaded(folder):
    return load_components(folder), StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)


def test_encoders_equal_diffusers_encode_prompt(loaded):
    ours, theirs = loaded
    with torch.no_grad():
        ref, ref_neg, ref_pooled, ref_neg_pooled = theirs.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=["blurry", "dark"])
        c, c_neg = ours.text_encoder.encode_pair(PROMPTS, ["blurry", "dark"])
        pooled, neg_pooled = ours.text_encoder.pooled(PROMPTS), ours.text_encoder.pooled(["blurry", "dark"])
    assert c.shape == ref.shape == (2, 77, 80)
    for got, want in ((c, ref), (c_neg, ref_neg), (pooled, ref_pooled), (neg_pooled, ref_neg_pooled)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_long_prompt_is_windowed_and_pooled_from_its_first_window(loaded):
    """Past 77 tokens each encoder gives two windows (ldm.networks.prompt_encoder); the pooled embedding is that of
    the first window, which is diffusers' truncated prompt."""
    ours, theirs = loaded
    with torch.no_grad():
        c = ours.text_encoder.encode([LONG])
        _, _, ref_pooled, _ = theirs.encode_prompt([LONG], device="cpu", do_classifier_free_guidance=False)
        pooled = ours.text_encoder.pooled([LONG])
    assert c.shape == (1, 154, 80)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-6)


def test_force_zeros_for_empty_prompt_is_read_and_written(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    c = load_components(copy)
    assert c.text_encoder.force_zeros_for_empty_prompt is False
    save_pipeline(tmp_path / "saved", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert saved["_class_name"] == "StableDiffusionXLPipeline" and saved["force_zeros_for_empty_prompt"] is False
    assert StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved").config.force_zeros_for_empty_prompt is False


def test_a_missing_second_encoder_is_named(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match=r"missing subfolder\(s\) \['tokenizer_2'\]"):
        load_components(copy)


def test_parts_that_do_not_fit_are_named(loaded):
    ours, _ = loaded
    sd = tiny_components()
    with pytest.raises(IncompatibleComponentsError, match="addition_embed_type 'text_time' \\(SDXL\\) but the text "
                                                          "encoder gives no pooled embedding"):
        check_components(ours.unet, ours.vae, sd.text_encoder)
    with pytest.raises(IncompatibleComponentsError, match="SDXL's text encoders need a U-Net with addition_embed_type"):
        check_components(sd.unet, sd.vae, ours.text_encoder)


def test_ldm_info_lists_both_encoders(loaded):
    from pipelines.cli import model_info

    ours, _ = loaded
    info = model_info(ours)
    assert info["text_encoder"]["hidden_size"] == 32 and info["text_encoder_2"]["hidden_size"] == 48
    assert info["text_encoder_2"]["class"] == "CLIPTextModelWithProjection"
    assert info["text_encoder_2"]["pad_token"] == "!"
    parts = (ours.unet, ours.vae, ours.text_encoder)
    assert info["total_parameters"] == sum(p.numel() for m in parts for p in m.parameters())
