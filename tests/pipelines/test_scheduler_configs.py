"""Scheduler configs read as diffusers reads them, on the tiny random weights: steps_offset, clip_sample, the
scheduler class kept on save, DDIM's landing points under trailing spacing, Heun under zero terminal SNR."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

from ldm.loading.components import save_pipeline
from pipelines.text_to_image import Pipeline
from pipelines.tiny import tiny_components
from tests.pipelines._parity import (
    ALL_SAMPLER_SCHEDULERS,
    PROMPTS,
    SCALE,
    STEPS,
    _compare_with_diffusers,
    _init_image,
)


def variant(folder, tmp_path_factory, name, **changes):
    """A copy of the tiny folder with `changes` written into its scheduler_config.json."""
    path = tmp_path_factory.mktemp(name) / "model"
    shutil.copytree(folder, path)
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.fixture(scope="module")
def offset0_folder(folder, tmp_path_factory):
    """A folder whose scheduler config says steps_offset 0, as from-scratch training configs used to export."""
    return variant(folder, tmp_path_factory, "tiny_offset0", steps_offset=0)




@pytest.mark.parametrize("sampler, scheduler_cls", ALL_SAMPLER_SCHEDULERS)
def test_a_folder_with_another_steps_offset_samples_as_in_diffusers(offset0_folder, sampler, scheduler_cls):
    """diffusers' StableDiffusionPipeline samples every folder with steps_offset 1; so do we (with a warning), for
    every sampler that has a diffusers scheduler: images within 1/255 (1.51/255 apart before)."""
    with pytest.warns(UserWarning, match="steps_offset is 0; sampling with 1"):
        ours = Pipeline.from_pretrained(offset0_folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(offset0_folder, safety_checker=None, requires_safety_checker=False)
    assert ours.schedule.steps_offset == 1 == theirs.scheduler.config.steps_offset
    _compare_with_diffusers(ours, theirs, sampler, scheduler_cls)


def test_saved_folders_record_steps_offset_one(tmp_path):
    """A schedule with steps_offset 0 is written as 1 (what diffusers samples it with), and reads back without warning."""
    import dataclasses
    import warnings

    c = tiny_components(seed=0)
    save_pipeline(tmp_path / "m", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder,
                  schedule=dataclasses.replace(c.schedule, steps_offset=0))
    assert json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())["steps_offset"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Pipeline.from_pretrained(tmp_path / "m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def diffusers_euler_folder(folder, tmp_path_factory):
    """The tiny weights saved by diffusers with a default EulerDiscreteScheduler: its config has no clip_sample key
    (none of diffusers' non-DDIM schedulers write one), so DDIM / DDPM made from it clip x0 by their default."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading")
    path = tmp_path_factory.mktemp("diffusers_euler") / "model"
    pipe.save_pretrained(path)
    assert "clip_sample" not in json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return path


@pytest.mark.parametrize("sampler, scheduler_cls", [("ddim", DDIMScheduler), ("ddpm", DDPMScheduler),
                                                    ("euler", EulerDiscreteScheduler)])
def test_a_config_without_clip_sample_clips_x0_as_diffusers_does(diffusers_euler_folder, sampler, scheduler_cls):
    """diffusers' DDIM / DDPM made with from_config of such a folder clip x0 to [-1, 1]; ours do too (within 1/255,
    209-230/255 apart before), and clipping changes these images, so the comparison can fail."""
    ours = Pipeline.from_pretrained(diffusers_euler_folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(diffusers_euler_folder, safety_checker=None,
                                                     requires_safety_checker=False)
    assert ours.schedule.clip_sample is None and ours.schedule.clips_x0()
    _compare_with_diffusers(ours, theirs, sampler, scheduler_cls)
    if sampler != "euler":
        unclipped = scheduler_cls.from_config(theirs.scheduler.config, clip_sample=False)
        theirs.scheduler = unclipped
        kw = dict(num_inference_steps=STEPS, guidance_scale=SCALE, height=32, width=32, output_type="np",
                  latents=torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)))
        plain = theirs(PROMPTS, generator=torch.Generator().manual_seed(2), **kw).images
        got = ours(PROMPTS, generator=torch.Generator().manual_seed(2), sampler=sampler, progress=False, **kw).images
        assert np.abs(got - plain).max() > 10 / 255  # clipping mattered here


def test_save_pretrained_keeps_the_folders_scheduler_class_and_keys(sd15_folder, tmp_path):
    """A folder with SD 1.5's PNDM scheduler re-saved by us still names PNDMScheduler (model_index.json too) and keeps
    the keys we do not model (skip_prk_steps), so plain diffusers samples it with the same scheduler as before."""
    Pipeline.from_pretrained(sd15_folder, device="cpu", dtype=torch.float32).save_pretrained(tmp_path / "again")
    config = json.loads((tmp_path / "again" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and config["skip_prk_steps"] is True
    assert config["set_alpha_to_one"] is False and config["clip_sample"] is False
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                                              "PNDMScheduler"]
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "again", safety_checker=None,
                                                     requires_safety_checker=False)
    assert type(theirs.scheduler).__name__ == "PNDMScheduler"


def test_dynamic_thresholding_is_refused_by_name():
    from ldm.diffusion.schedule import NoiseSchedule

    with pytest.raises(ValueError, match="dynamic thresholding"):
        NoiseSchedule.from_diffusers({"thresholding": True})


@pytest.fixture(scope="module")
def trailing_folder(folder, tmp_path_factory):
    """The tiny weights with "trailing" spacing (the zero-SNR recipe's): diffusers' DDIM steps t -> t - T//n there."""
    return variant(folder, tmp_path_factory, "tiny_trailing", timestep_spacing="trailing")


@pytest.mark.parametrize("image", [False, True])
def test_ddim_with_trailing_spacing_equals_diffusers(trailing_folder, monkeypatch, image):
    """30 steps do not divide 1000: the timesteps are 999, 966, 932, ..., and diffusers' DDIM steps t -> t - T//n,
    so from 966 it lands on 933 and restarts at 932; ours follows it, text-to-image and img2img within 1/255, where
    walking the timesteps is further off."""
    import dataclasses

    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module

    from ldm.diffusion.samplers import SAMPLERS

    ours = Pipeline.from_pretrained(trailing_folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(trailing_folder, safety_checker=None,
                                                     requires_safety_checker=False)
    scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    kw = dict(num_inference_steps=30, guidance_scale=SCALE, output_type="np")
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    if image:
        monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())
        pipe = StableDiffusionImg2ImgPipeline(**{**theirs.components, "scheduler": scheduler})
        kw.update(image=_init_image(), strength=0.6)
    else:
        pipe = StableDiffusionPipeline(**{**theirs.components, "scheduler": scheduler})
        kw.update(height=32, width=32, latents=noise)
    ref = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(2), **kw).images
    kw.update(latents=noise)
    got = ours(PROMPTS[0], sampler="ddim", progress=False, **kw).images
    assert np.abs(got - ref).max() <= 1 / 255, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    monkeypatch.setitem(SAMPLERS, "ddim", dataclasses.replace(SAMPLERS["ddim"], skips_uniformly=False))
    walked = ours(PROMPTS[0], sampler="ddim", progress=False, **kw).images
    assert np.abs(walked - ref).max() > 1 / 255  # walking the timesteps instead would fail this comparison


@pytest.fixture(scope="module")
def zero_snr_folder(folder, tmp_path_factory):
    """The tiny weights with a zero-terminal-SNR schedule (Lin et al. 2024: rescaled betas, trailing spacing; the tiny
    model predicts eps, and diffusers clamps the infinite first sigma as we do)."""
    return variant(folder, tmp_path_factory, "tiny_zero_snr", rescale_betas_zero_snr=True, timestep_spacing="trailing")


@pytest.mark.parametrize("sampler, scheduler_cls", [("heun", HeunDiscreteScheduler), ("euler", EulerDiscreteScheduler)])
def test_zero_snr_folders_sample_as_each_diffusers_scheduler_reads_them(zero_snr_folder, monkeypatch, sampler,
                                                                         scheduler_cls):
    """diffusers' Heun ignores rescale_betas_zero_snr, its Euler applies it; ours do the same (within 1/255), and
    for Heun the difference is real (the rescaled schedule would be > 1/255 off)."""
    import dataclasses

    from ldm.diffusion.samplers import SAMPLERS

    ours = Pipeline.from_pretrained(zero_snr_folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(zero_snr_folder, safety_checker=None,
                                                     requires_safety_checker=False)
    _compare_with_diffusers(ours, theirs, sampler, scheduler_cls)
    if sampler == "heun":
        monkeypatch.setitem(SAMPLERS, "heun", dataclasses.replace(SAMPLERS["heun"], reads_zero_snr=True))
        with pytest.raises(AssertionError, match="max abs pixel difference"):
            _compare_with_diffusers(ours, theirs, sampler, scheduler_cls)


def test_convert_and_save_keep_what_the_original_config_said(sd15_folder, tmp_path):
    """`ldm convert` folder -> folder keeps the scheduler class and unmodelled keys; where our schedule leaves a key
    unsaid (None: the class default), the original's value is not let through either."""
    from ldm.diffusion.schedule import NoiseSchedule
    from ldm.loading.components import save_schedule
    from pipelines.cli import main

    assert main(["convert", str(sd15_folder), str(tmp_path / "copy")]) == 0
    config = json.loads((tmp_path / "copy" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler" and config["skip_prk_steps"] is True
    unsaid = NoiseSchedule(timestep_spacing=None, clip_sample=None)
    save_schedule(unsaid, tmp_path / "s", {"_class_name": "DDIMScheduler", "timestep_spacing": "trailing",
                                            "clip_sample": True, "foo": 1})
    written = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    assert "timestep_spacing" not in written and "clip_sample" not in written and written["foo"] == 1
    assert NoiseSchedule.from_diffusers(written) == unsaid


def test_a_single_file_samples_with_steps_offset_one(tmp_path):
    """As a folder does, and as diffusers' from_single_file does: a file whose configs say steps_offset 0 warns and
    samples with 1; the metadata we write records 1."""
    import dataclasses

    from safetensors import safe_open

    from ldm.loading.single_file import METADATA_KEY, load_single_file, save_single_file

    c = tiny_components(seed=0)
    c = dataclasses.replace(c, schedule=dataclasses.replace(c.schedule, steps_offset=0))
    save_single_file(c, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["scheduler"]["steps_offset"] == 1
    save_pipeline(tmp_path / "folder", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    config = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    (tmp_path / "folder" / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "steps_offset": 0}))
    with pytest.warns(UserWarning, match="steps_offset is 0; sampling with 1"):
        back = load_single_file(tmp_path / "m.safetensors", config_folder=tmp_path / "folder")
    assert back.schedule.steps_offset == 1 and back.scheduler_config["steps_offset"] == 0


@pytest.mark.parametrize("sampler, scheduler_cls", [("heun", HeunDiscreteScheduler), ("euler", EulerDiscreteScheduler),
                                                    ("euler_ancestral", EulerAncestralDiscreteScheduler)])
def test_euler_family_with_trailing_spacing_starts_where_diffusers_does(folder, tmp_path_factory, sampler,
                                                                          scheduler_cls):
    """diffusers' Euler family starts from sigma_max * noise under linspace / trailing spacing (its init_noise_sigma),
    not from the VP prior; ours follows it (Sampler.plan's ve_prior): heun with v prediction was 1.2/255 off before."""
    path = variant(folder, tmp_path_factory, "tiny_trailing_v", timestep_spacing="trailing",
                   prediction_type="v_prediction")
    ours = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    _compare_with_diffusers(ours, theirs, sampler, scheduler_cls)
