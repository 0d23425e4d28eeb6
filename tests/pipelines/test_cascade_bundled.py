"""The bundled 64 -> 256 stage as the default: Cascade(), Upscaler.from_pretrained("default") and `ldm generate
--upscale` without a folder resolve ldm.loading.sources.DEFAULT_UPSCALER (pointed here at a tiny upscaler folder),
sample with its defaults (BUNDLED_UPSCALER_SAMPLING: a call naming none of them equals one naming them all), and a
missing bundled folder is an error naming it."""

import pytest
import torch
from PIL import Image

from ldm.diffusion.samplers import SAMPLERS
from ldm.loading import sources
from ldm.loading.upscaler import save_upscaler
from pipelines.cascade import Cascade
from pipelines.text_to_image import Pipeline
from pipelines.tiny import tiny_upscaler_components
from pipelines.upscaler import Upscaler
from tests._helpers import save_tiny_folder

PROMPT = "a red circle above a blue square"
FAST = {"sampler": "ddim", "num_inference_steps": 4, "noise_level": 30, "guidance_scale": 1.0, "strength": 0.5}


@pytest.fixture(scope="module")
def stage_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundled") / "upscaler"
    save_upscaler(path, tiny_upscaler_components(seed=0))
    return path


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("bundled") / "model")


@pytest.fixture
def bundled(monkeypatch, stage_folder, base_folder):
    """The bundled model and stage are the tiny folders; the stage's defaults a fast setting."""
    monkeypatch.setattr(sources, "DEFAULT_MODEL", base_folder)
    monkeypatch.setattr(sources, "DEFAULT_UPSCALER", stage_folder)
    monkeypatch.setattr(sources, "BUNDLED_UPSCALER_SAMPLING", dict(FAST))
    return stage_folder


def low_res() -> torch.Tensor:
    return torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_the_shipped_defaults_are_valid_settings():
    d = sources.BUNDLED_UPSCALER_SAMPLING
    assert set(d) == set(sources.UPSCALER_SAMPLING) == {"sampler", "num_inference_steps", "noise_level",
                                                         "guidance_scale", "strength"}
    assert d["sampler"] in SAMPLERS and 1 <= d["num_inference_steps"] <= 1000 and 0 <= d["noise_level"] <= 350
    assert 0 < d["strength"] <= 1 and int(d["num_inference_steps"] * d["strength"]) >= 1
    assert sources.DEFAULT_UPSCALER == sources.DEFAULT_MODEL / "upscaler"


def test_default_upscaler_is_the_bundled_folder_with_its_defaults(bundled):
    up = Upscaler.from_pretrained("default", device="cpu", dtype=torch.float32)
    assert up.sampling_defaults == FAST
    by_path = Upscaler.from_pretrained(bundled, device="cpu", dtype=torch.float32)  # its folder: the same
    assert by_path.sampling_defaults == FAST
    implicit = up(PROMPT, image=low_res(), seed=1, output_type="latent", progress=False).images
    explicit = up(PROMPT, image=low_res(), seed=1, output_type="latent", progress=False, **FAST).images
    assert torch.equal(implicit, explicit)
    for change in ({"noise_level": 200}, {"strength": 1.0}):  # the comparison above can fail
        other = up(PROMPT, image=low_res(), seed=1, output_type="latent", progress=False, **{**FAST, **change}).images
        assert (other - implicit).abs().max() > 1e-3


def test_other_folders_keep_diffusers_call_defaults(stage_folder, tmp_path):
    save_upscaler(tmp_path / "other", tiny_upscaler_components(seed=0))
    up = Upscaler.from_pretrained(tmp_path / "other", device="cpu", dtype=torch.float32)
    assert up.sampling_defaults == {"sampler": "dpmpp_2m", "num_inference_steps": 30, "noise_level": 20,
                                    "guidance_scale": 9.0, "strength": 1.0}


def test_cascade_without_arguments_is_the_bundled_pair(bundled):
    cascade = Cascade(device="cpu", dtype=torch.float32)
    assert cascade.upscaler.sampling_defaults == FAST and cascade.base.sampling_defaults["sampler"] == "euler"
    kw = dict(num_inference_steps=2, output_type="pt", progress=False)
    got = cascade(PROMPT, seed=3, **kw)
    assert got.images.shape == (1, 3, 128, 128)  # the tiny base's 32 px, x4
    same = Cascade.from_pretrained(device="cpu", dtype=torch.float32)(PROMPT, seed=3, **kw)
    assert torch.equal(got.images, same.images)
    base = Pipeline.from_pretrained(sources.DEFAULT_MODEL, device="cpu", dtype=torch.float32)
    assert torch.equal(Cascade(base)(PROMPT, seed=3, **kw).images, got.images)


def test_a_missing_bundled_stage_is_an_error_naming_it(monkeypatch, tmp_path, base_folder, capsys):
    from pipelines.cli import main

    monkeypatch.setattr(sources, "DEFAULT_UPSCALER", tmp_path / "absent")
    with pytest.raises(sources.ModelNotFoundError, match="bundled super-resolution stage is missing from .*absent"):
        Upscaler.from_pretrained("default")
    base = Pipeline.from_pretrained(base_folder, device="cpu", dtype=torch.float32)
    with pytest.raises(sources.ModelNotFoundError, match="bundled super-resolution stage is missing"):
        Cascade(base)
    args = ["generate", PROMPT, "--model", str(base_folder), "--upscale", "--steps", "1", "--device", "cpu",
            "--no-progress", "-o", str(tmp_path / "a.png")]
    assert main(args) != 0
    assert "bundled super-resolution stage is missing" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_cli_upscale_without_a_folder_uses_the_bundled_stage(bundled, base_folder, tmp_path):
    from pipelines.cli import main

    args = ["generate", PROMPT, "--model", str(base_folder), "--steps", "2", "--seed", "1", "--device", "cpu",
            "--dtype", "float32", "--no-progress"]
    assert main([*args, "--upscale", "-o", str(tmp_path / "a.png")]) == 0  # a flag after it: no folder
    assert main([*args, "-o", str(tmp_path / "b.png"), "--upscale", str(bundled)]) == 0
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size == (128, 128) and a.tobytes() == b.tobytes()
