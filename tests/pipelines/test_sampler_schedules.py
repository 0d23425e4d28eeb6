"""The new samplers and sigma schedules in the Pipeline against diffusers' StableDiffusionPipeline (tiny weights)."""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import AysSchedules

from pipelines.text_to_image import Pipeline
from tests.pipelines._parity import PROMPTS, SCALE


@pytest.fixture(scope="module")
def ours(folder):
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(folder):
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.folder_config = pipe.scheduler.config  # each case builds its scheduler from the folder's own config
    return pipe


def _compare(ours, theirs, scheduler, steps=6, their_kwargs=None, **our_kwargs):
    """Same weights, prompts, latents and seeded generator (one for the batch: diffusers' SDE noise draws come from
    it): max abs pixel difference <= 1/255, and the images are not constant."""
    theirs.scheduler = scheduler
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=steps, guidance_scale=SCALE, latents=latents, height=32, width=32, output_type="np")
    ref = theirs(PROMPTS, generator=torch.Generator().manual_seed(2), **kw, **(their_kwargs or {})).images
    got = ours(PROMPTS, generator=torch.Generator().manual_seed(2), progress=False, **kw, **our_kwargs).images
    assert got.shape == ref.shape == (2, 32, 32, 3)
    assert np.abs(got - ref).max() <= 1 / 255, f"{our_kwargs}: max abs pixel difference {np.abs(got - ref).max():.2e}"
    assert np.abs(ref - ref.mean()).max() > 0.01


@pytest.mark.parametrize("sampler,scheduler_cls,extra", [
    ("unipc", UniPCMultistepScheduler, {}),
    ("lms", LMSDiscreteScheduler, {}),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
])
def test_new_samplers_equal_diffusers(ours, theirs, sampler, scheduler_cls, extra):
    _compare(ours, theirs, scheduler_cls.from_config(theirs.folder_config, **extra), sampler=sampler)


@pytest.mark.parametrize("sampler,scheduler_cls,sigma_schedule,extra", [
    ("unipc", UniPCMultistepScheduler, "exponential", {"use_exponential_sigmas": True}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, "exponential", {"use_exponential_sigmas": True}),
    ("euler", EulerDiscreteScheduler, "exponential", {"use_exponential_sigmas": True}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, "sgm_uniform", {"timestep_spacing": "trailing"}),
    ("unipc", UniPCMultistepScheduler, "karras", {"use_karras_sigmas": True}),
])
def test_sigma_schedules_equal_diffusers(ours, theirs, sampler, scheduler_cls, sigma_schedule, extra):
    """exponential = use_exponential_sigmas, sgm_uniform = trailing spacing, karras = use_karras_sigmas."""
    _compare(ours, theirs, scheduler_cls.from_config(theirs.folder_config, **extra), sampler=sampler,
             sigma_schedule=sigma_schedule)


@pytest.mark.parametrize("steps", [10, 6])
def test_align_your_steps_equals_diffusers_custom_sigmas(ours, theirs, steps):
    """diffusers' documented AYS use: EulerDiscreteScheduler with sigmas=AysSchedules["StableDiffusionSigmas"]; other
    step counts with the same log-linear interpolation passed as sigmas."""
    from ldm.diffusion.sigma_schedules import ays_sigmas

    sigmas = AysSchedules["StableDiffusionSigmas"] if steps == 10 else ays_sigmas("ays_sd15", steps).tolist()
    _compare(ours, theirs, EulerDiscreteScheduler.from_config(theirs.folder_config), steps=steps,
             their_kwargs={"sigmas": sigmas}, sampler="euler", sigma_schedule="ays_sd15")


def test_sigma_schedule_errors(ours):
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="latent", progress=False)
    with pytest.raises(ValueError, match="unknown sigma schedule 'ays'; valid: default, karras, exponential"):
        ours(PROMPTS[0], sigma_schedule="ays", **kw)
    with pytest.raises(ValueError, match="karras_sigmas=True contradicts sigma_schedule='exponential'"):
        ours(PROMPTS[0], sigma_schedule="exponential", karras_sigmas=True, **kw)
    a = ours(PROMPTS[0], seed=0, karras_sigmas=True, **kw).images
    assert torch.equal(a, ours(PROMPTS[0], seed=0, sigma_schedule="karras", **kw).images)  # the alias


def test_cli_sigma_schedule(folder, tmp_path, capsys):
    """`--sigma-schedule` reaches the pipeline (a different image than the default schedule's; the same as the Python
    call's); an unknown name is a one-line usage error listing the valid ones, with no image written."""
    from PIL import Image

    from pipelines.cli import main

    def generate(out, *extra):
        return main(["generate", PROMPTS[0], "-o", str(out), "--model", str(folder), "--steps", "3", "--seed", "0",
                     "--no-progress", "--device", "cpu", "--dtype", "float32", "--sampler", "unipc", *extra])

    assert generate(tmp_path / "ays.png", "--sigma-schedule", "ays_sd15") == 0
    assert generate(tmp_path / "default.png") == 0
    ays, default = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("ays", "default"))
    assert np.abs(ays.astype(int) - default.astype(int)).max() > 2
    pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    same = pipe(PROMPTS[0], num_inference_steps=3, seed=0, sampler="unipc", sigma_schedule="ays_sd15", progress=False)
    assert np.array_equal(np.asarray(same.images[0]), ays)
    capsys.readouterr()
    assert generate(tmp_path / "bad.png", "--sigma-schedule", "kerras") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown sigma schedule 'kerras'; valid: default, karras" in err
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("sampler,scheduler_cls,extra", [
    ("unipc", UniPCMultistepScheduler, {}),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
])
def test_img2img_equals_diffusers(ours, theirs, monkeypatch, sampler, scheduler_cls, extra):
    """The last int(steps * strength) steps, as StableDiffusionImg2ImgPipeline (its VAE posterior sample patched to the
    mode, as in tests/pipelines/test_pipeline.py; its generator then draws the start noise, then the SDE noise)."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
    from diffusers import StableDiffusionImg2ImgPipeline

    from tests.pipelines._parity import _init_image

    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())
    pipe = StableDiffusionImg2ImgPipeline(**{**theirs.components, "scheduler": scheduler_cls.from_config(
        theirs.folder_config, **extra)})
    kw = dict(num_inference_steps=10, strength=0.6, guidance_scale=SCALE, output_type="np")
    ref = pipe(PROMPTS[0], image=_init_image(), generator=torch.Generator().manual_seed(2), **kw).images
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1, 4, 4, 4, generator=gen)
    got = ours(PROMPTS[0], image=_init_image(), latents=noise, generator=gen, sampler=sampler, progress=False,
               **kw).images
    assert np.abs(got - ref).max() <= 1 / 255, f"{sampler}: max abs pixel difference {np.abs(got - ref).max():.2e}"
