"""Pipeline folders: ours load in diffusers' StableDiffusionPipeline, diffusers' load in ours, bit-exact."""

import json

import pytest
from diffusers import StableDiffusionPipeline

from ldm.io import WeightsError
from ldm.loading.components import IncompatibleComponentsError, load_pipeline_folder, save_pipeline
from pipelines.tiny import tiny_components
from tests._helpers import same_weights


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    c = tiny_components(seed=0)
    path = tmp_path_factory.mktemp("pipe") / "model"
    save_pipeline(path, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    return c, path


def test_layout_and_our_round_trip(saved):
    c, path = saved
    assert sorted(p.name for p in path.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]  # fmt: skip
    assert not list(path.rglob("*.bin")) and len(list(path.rglob("*.safetensors"))) == 3
    back = load_pipeline_folder(path)
    assert same_weights(back.unet, c.unet) and same_weights(back.vae, c.vae) and same_weights(back.text_encoder.model, c.text_encoder.model)
    assert back.schedule == c.schedule


def test_diffusers_loads_our_folder_and_we_load_theirs(saved, tmp_path):
    c, path = saved
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    assert same_weights(pipe.unet, c.unet) and same_weights(pipe.vae, c.vae) and same_weights(pipe.text_encoder, c.text_encoder.model)
    assert pipe.tokenizer("a red circle").input_ids == c.text_encoder.tokenizer("a red circle").input_ids
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    pipe.save_pretrained(tmp_path / "theirs")
    back = load_pipeline_folder(tmp_path / "theirs")
    assert same_weights(back.unet, c.unet) and same_weights(back.vae, c.vae) and same_weights(back.text_encoder.model, c.text_encoder.model)
    assert back.schedule == c.schedule


def test_incompatible_components_are_named(tmp_path):
    c = tiny_components(seed=0, text_hidden_size=48)
    with pytest.raises(IncompatibleComponentsError, match="embedding size is 48 but the U-Net's cross_attention_dim is 32"):
        save_pipeline(tmp_path / "bad", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    assert not (tmp_path / "bad").exists()


def test_missing_and_corrupt_files_are_clear_errors(saved, tmp_path):
    _, path = saved
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        load_pipeline_folder(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match=r"missing subfolder\(s\) \['vae'\]"):
        load_pipeline_folder(broken)
    shutil.copytree(path / "vae", broken / "vae")
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_pipeline_folder(broken)
    cfg = json.loads((path / "unet" / "config.json").read_text())
    assert cfg["cross_attention_dim"] == 32


def test_a_missing_bundled_model_says_how_to_get_it_back(tmp_path, monkeypatch):
    """Pipeline(), `ldm generate` without --model and "default" all load through load_components, which names the
    missing bundled model and the way out."""
    import ldm.loading.sources as sources

    monkeypatch.setattr(sources, "DEFAULT_MODEL", tmp_path / "default_model")
    for path in ("default", tmp_path / "default_model"):
        with pytest.raises(sources.ModelNotFoundError, match="bundled default model is missing .* reinstall"):
            sources.load_components(path)
