"""Fixtures of the pipeline tests: the tiny random model as our folder and with SD 1.5's scheduler config."""

import json

import pytest
import torch
from diffusers import (
    StableDiffusionPipeline,
)

from ldm.loading.components import save_pipeline
from pipelines.text_to_image import Pipeline
from pipelines.tiny import tiny_components
from tests._helpers import save_tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ours(folder):
    """Our Pipeline on the tiny folder, fp32 (diffusers' arithmetic)."""
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(folder):
    """diffusers' StableDiffusionPipeline on the same folder."""
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


# Stable Diffusion 1.5's scheduler_config.json: PNDM, set_alpha_to_one false, no timestep_spacing
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    """The tiny weights with SD 1.5's scheduler config."""
    c = tiny_components(seed=0)
    path = tmp_path_factory.mktemp("tiny_sd15") / "model"
    save_pipeline(path, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    return path


@pytest.fixture(scope="module")
def sd15_pipelines(sd15_folder):
    ours = Pipeline.from_pretrained(sd15_folder, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionPipeline.from_pretrained(sd15_folder, safety_checker=None, requires_safety_checker=False)
    assert type(theirs.scheduler).__name__ == "PNDMScheduler"
    return ours, theirs, theirs.scheduler.config
