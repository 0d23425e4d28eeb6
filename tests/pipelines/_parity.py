"""What the pipeline tests compare with: diffusers on the same weights, latents and generator, within 1/255."""


import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from PIL import Image


PROMPTS = ["a red circle above a blue square", "two green stars"]
STEPS, SCALE = 6, 7.5


SAMPLER_SCHEDULERS = [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler),
                      ("euler_ancestral", EulerAncestralDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)]


def _compare_with_diffusers(ours, theirs, sampler, scheduler_cls, **options):
    """Images of `theirs` (as it is set up) and of `ours` with `options` agree within 1/255; returns ours."""
    theirs.scheduler = scheduler_cls.from_config(theirs.scheduler.config)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = theirs(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, latents=latents, height=32, width=32,
                 generator=torch.Generator().manual_seed(2), output_type="np").images  # fmt: skip
    got = ours(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, latents=latents, height=32, width=32,
               generator=torch.Generator().manual_seed(2), sampler=sampler, output_type="np", progress=False,
               **options).images
    assert got.shape == ref.shape == (2, 32, 32, 3)
    assert np.abs(got - ref).max() <= 1 / 255, f"{sampler}: max abs pixel difference {np.abs(got - ref).max():.2e}"
    assert np.abs(ref - ref.mean()).max() > 0.01  # the images are not constant, so the comparison can fail
    return got



def _init_image():
    """A 32x32 image with structure (a gradient and a block), so the comparison has something to get wrong."""
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([x * 8, y * 8, np.where((x > 8) & (x < 20) & (y > 10), 230, 20)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))



ALL_SAMPLER_SCHEDULERS = [*SAMPLER_SCHEDULERS, ("heun", HeunDiscreteScheduler), ("ddpm", DDPMScheduler)]
