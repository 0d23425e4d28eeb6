"""Single-file checkpoints in the CompVis layout: round trips, pickle gating, presets and named errors."""

import pytest
import torch

from ldm.io import WeightsError, load_state_dict
from ldm.loading.components import save_pipeline
from ldm.loading.single_file import load_single_file, save_single_file
from pipelines.tiny import tiny_components
from tests._helpers import same_weights


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    c = tiny_components(seed=3)
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_single_file(c, path)
    return c, path


def test_round_trip_is_bit_exact(saved):
    c, path = saved
    keys = list(load_state_dict(path))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    back = load_single_file(path)
    assert same_weights(back.unet, c.unet) and same_weights(back.vae, c.vae) and same_weights(back.text_encoder.model, c.text_encoder.model)
    assert back.schedule == c.schedule


def test_pickle_checkpoint_needs_the_flag_and_configs_can_come_from_a_folder(saved, tmp_path):
    c, path = saved
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_state_dict(path)}, ckpt)
    with pytest.raises(WeightsError, match="pickle file.*allow_pickle=True"):
        load_single_file(ckpt)
    save_pipeline(tmp_path / "folder", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    back = load_single_file(ckpt, allow_pickle=True, config_folder=tmp_path / "folder")
    assert same_weights(back.unet, c.unet) and same_weights(back.vae, c.vae) and same_weights(back.text_encoder.model, c.text_encoder.model)


def test_without_metadata_the_sd_presets_apply_and_mismatches_are_named(saved, tmp_path):
    _, path = saved
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_state_dict(path), str(bare))  # no metadata: SD 1.x preset configs (860M U-Net) do not fit
    with pytest.raises(WeightsError, match=r"\(unet\): .*shape mismatch .*conv_in.weight: model \(320, 4, 3, 3\) vs file \(32, 4, 3, 3\)"):
        load_single_file(bare)


def test_prediction_type_override(saved):
    _, path = saved
    assert load_single_file(path, prediction_type="v_prediction").schedule.prediction_type == "v_prediction"


def test_a_single_file_without_configs_loads_with_a_config_folder(tmp_path):
    """A file of non-SD sizes and no metadata loads with config= a fitting pipeline folder (diffusers'
    from_single_file(config=...)), bit-exact; without it the error names the family preset and the config= way out."""
    from safetensors.torch import load_file, save_file

    from ldm.io import WeightsError
    from ldm.loading.sources import load_components
    from pipelines.text_to_image import Pipeline
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)
    save_pipeline(tmp_path / "folder", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    save_single_file(c, tmp_path / "with-meta.safetensors")
    save_file(load_file(tmp_path / "with-meta.safetensors"), tmp_path / "bare.safetensors")  # no metadata
    back = load_components(tmp_path / "bare.safetensors", config=tmp_path / "folder")
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(back, part), getattr(c, part)), part
    pipe = Pipeline.from_pretrained(tmp_path / "bare.safetensors", config=tmp_path / "folder", device="cpu",
                                    dtype=torch.float32)
    assert same_weights(pipe.unet, c.unet)
    with pytest.raises(WeightsError, match=r"not shaped as the SD 1.x preset: .*pass config="):
        load_components(tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="config= is for single-file checkpoints"):
        load_components(tmp_path / "folder", config=tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="is not a pipeline folder"):
        load_components(tmp_path / "bare.safetensors", config=tmp_path)


@pytest.mark.parametrize("keys, family", [
    (["conditioner.embedders.0.model.token_embedding.weight"], "SDXL refiner"),
])  # SDXL loads: tests/loading/test_sdxl_single_file.py; single-file inpainting (9-channel conv_in) loads: tests/pipelines/test_inpaint.py
def test_an_unsupported_family_is_refused_by_name(tmp_path, keys, family):
    from safetensors.torch import save_file

    from ldm.io import WeightsError

    state = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 9 if family.endswith("inpainting") else 4,
                                                                             3, 3)}
    state.update({k: torch.zeros(1) for k in keys if "." in k})
    save_file(state, tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match=rf"m.safetensors is an {family} checkpoint, which is not supported yet"):
        load_single_file(tmp_path / "m.safetensors")


def test_an_openclip_text_encoder_is_written_in_the_sd2_layout_that_diffusers_reads(tmp_path):
    """An SD 2.x-style model (OpenCLIP text tower: GELU, "!" padding) is written with `cond_stage_model.model.` keys and
    fused q/k/v, as A1111, ComfyUI and diffusers expect; it reads back bit-exact here, and diffusers'
    from_single_file (configs from a folder, offline) gives the same U-Net, VAE and text-encoder outputs."""
    import dataclasses

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from ldm.loading.single_file import text_layout
    from ldm.networks.text import TextEncoder
    from pipelines.tiny import tiny_text_config

    c = tiny_components(seed=5)
    config = tiny_text_config()
    config.hidden_act = "gelu"
    c = dataclasses.replace(c, text_encoder=TextEncoder.from_config(config, seed=7, pad_token="!"))
    assert text_layout(c.text_encoder) == "open_clip"
    save_pipeline(tmp_path / "folder", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    save_single_file(c, tmp_path / "sd2.safetensors")
    with safe_open(str(tmp_path / "sd2.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    back = load_single_file(tmp_path / "sd2.safetensors")
    for part in ("unet", "vae", "text_encoder"):
        assert same_weights(getattr(back, part), getattr(c, part)), part
    save_single_file(back, tmp_path / "again.safetensors")  # SD 2 file -> ours -> file: the same tensors
    assert same_weights(load_state_dict(tmp_path / "sd2.safetensors"), load_state_dict(tmp_path / "again.safetensors"))
    theirs = StableDiffusionPipeline.from_single_file(str(tmp_path / "sd2.safetensors"), config=str(tmp_path / "folder"),
                                                      local_files_only=True, safety_checker=None)
    assert same_weights(theirs.unet.state_dict(), c.unet.state_dict())
    assert same_weights(theirs.vae.state_dict(), c.vae.state_dict())
    ids = c.text_encoder.tokenizer(["a red circle"], padding="max_length", max_length=77,
                                   return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(theirs.text_encoder(ids).last_hidden_state,
                                   c.text_encoder.model(ids).last_hidden_state, atol=1e-6, rtol=0)
