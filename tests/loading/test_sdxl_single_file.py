"""SDXL single files in the SGM layout, both ways: the file we write loads in diffusers'
StableDiffusionXLPipeline.from_single_file(config=<folder>) with the folder's weights bit for bit, and loads back in
ours bit-exact; a bare SGM file (no metadata, the extra keys of released checkpoints) loads with config= a folder."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from ldm.io import WeightsError, load_state_dict
from ldm.loading.single_file import load_single_file, save_single_file
from ldm.loading.sources import load_components
from ldm.networks.text_sdxl import SDXLTextEncoder
from tests._helpers import same_weights
from tests.pipelines._sdxl import write_sdxl_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sdxl_folder(tmp_path_factory.mktemp("sdxl_file"))


@pytest.fixture(scope="module")
def written(folder, tmp_path_factory):
    c = load_components(folder)
    path = tmp_path_factory.mktemp("sgm") / "sdxl.safetensors"
    save_single_file(c, path)
    return c, path


def _same_components(a, b) -> bool:
    ta, tb = a.text_encoder, b.text_encoder
    return (same_weights(a.unet, b.unet) and same_weights(a.vae, b.vae)
            and same_weights(ta.text_encoder.model, tb.text_encoder.model)
            and same_weights(ta.text_encoder_2.model, tb.text_encoder_2.model))


def test_the_file_has_the_sgm_layout_and_round_trips_bit_exact(written):
    c, path = written
    keys = set(load_state_dict(path))
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.4.1.proj_in.weight",
                "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "first_stage_model.decoder.up.0.block.0.conv1.weight"):
        assert key in keys, key
    back = load_single_file(path)
    assert isinstance(back.text_encoder, SDXLTextEncoder) and _same_components(back, c)
    assert back.text_encoder.text_encoder_2.tokenizer.pad_token == "!"
    assert back.unet.config == c.unet.config and back.schedule == c.schedule


def test_diffusers_reads_our_file_with_the_folders_weights(folder, written):
    _, path = written
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    single = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                        add_watermarker=False)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert same_weights(getattr(single, name), getattr(theirs, name)), name


def test_a_bare_sgm_file_loads_with_a_config_folder(folder, written, tmp_path):
    """No metadata, and the keys released SDXL files carry that no part reads (logit_scale, position_ids)."""
    c, path = written
    state = load_state_dict(path)
    state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    bare = tmp_path / "bare.safetensors"
    save_file(state, str(bare))
    back = load_components(bare, config=folder)
    assert _same_components(back, c)
    with pytest.raises(WeightsError, match=r"bare.safetensors \(unet\).*SDXL base presets; pass config="):
        load_single_file(bare)  # no configs: SDXL base's 2.6 B U-Net does not fit the tiny weights
    save_file({**state, "conditioner.embedders.2.model.x": torch.zeros(1)}, str(bare))
    with pytest.raises(WeightsError, match=r"key\(s\) of no SDXL part.*conditioner.embedders.2.model.x"):
        load_single_file(bare, config_folder=folder)
