"""Upscaler against diffusers' StableDiffusionUpscalePipeline on the same tiny x4-upscaler-shaped weights and generator:
images within 1/255 (fp32, CPU; observed <= 4.2e-6) at several noise levels, guidance on and off, three samplers; the
folder round trip both ways with bit-equal weights."""

import json

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL as DiffusersVAE, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel)
from PIL import Image

from ldm.loading.components import IncompatibleComponentsError
from ldm.loading.upscaler import load_upscaler, save_upscaler
from pipelines.call_options import OptionError
from pipelines.tiny import tiny_upscaler_components
from pipelines.upscaler import Upscaler
from tests._helpers import same_weights

PROMPT, STEPS = "a red circle above a blue square", 3


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("upscaler") / "model"
    save_upscaler(path, tiny_upscaler_components(seed=0))
    return path


@pytest.fixture(scope="module")
def ours(folder):
    return Upscaler.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(folder):
    return StableDiffusionUpscalePipeline.from_pretrained(folder)


def low_res(size: int = 8, shift: int = 0) -> Image.Image:
    """A small image with structure (gradients and a block), so that the comparison has something to get wrong."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 30 + shift, y * 30, np.where((x > 2) & (y < 5), 220, 30)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


@pytest.mark.parametrize("sampler, scheduler_cls, scale, level", [
    ("ddim", DDIMScheduler, 1.0, 0), ("ddim", DDIMScheduler, 1.0, 20), ("ddim", DDIMScheduler, 7.5, 20),
    ("ddim", DDIMScheduler, 7.5, 300), ("euler", EulerDiscreteScheduler, 7.5, 100),
    ("dpmpp_2m", DPMSolverMultistepScheduler, 1.0, 350),
])
def test_images_equal_diffusers(ours, theirs, sampler, scheduler_cls, scale, level):
    theirs.scheduler = scheduler_cls.from_config(theirs.scheduler.config)
    kw = dict(image=low_res(), noise_level=level, num_inference_steps=STEPS, guidance_scale=scale, output_type="np")
    ref = theirs(PROMPT, generator=torch.Generator().manual_seed(3), **kw).images
    got = ours(PROMPT, generator=torch.Generator().manual_seed(3), sampler=sampler, progress=False, **kw).images
    assert got.shape == ref.shape == (1, 32, 32, 3)  # x4: the VAE's factor
    assert np.abs(got - ref).max() <= 1 / 255, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    assert np.abs(ref - ref.mean()).max() > 0.01  # not a constant image


def test_every_input_moves_the_image(ours):
    """The comparison above can fail: the image, the noise level and the guidance each change the result."""
    def up(**kw):
        args = dict(image=low_res(), noise_level=20, num_inference_steps=2, guidance_scale=1.0, seed=0,
                    output_type="latent", progress=False, sampler="ddim")
        return ours(PROMPT, **{**args, **kw}).images
    base = up()
    for changed in (up(image=low_res(shift=60)), up(noise_level=200), up(guidance_scale=5.0)):
        assert (changed - base).abs().max() > 1e-3


def test_batches_seeds_and_latents(ours):
    kw = dict(noise_level=20, num_inference_steps=2, output_type="latent", progress=False, sampler="ddim")
    batch = ours([PROMPT, "two green stars"], image=low_res(), seed=5, num_images_per_prompt=2, **kw)
    assert batch.seeds == [5, 6, 7, 8] and batch.images.shape == (4, 4, 8, 8)
    single = ours("two green stars", image=low_res(), seed=7, **kw).images  # image 2: the second prompt, seed 7
    torch.testing.assert_close(batch.images[2:3], single, rtol=1e-4, atol=1e-4)  # CPU kernels vary with the batch
    per_prompt = ours([PROMPT, PROMPT], image=[low_res(), low_res(shift=60)], seed=[1, 1], **kw).images
    assert (per_prompt[0] - per_prompt[1]).abs().max() > 1e-3  # one image per prompt, same seed: different results
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = ours(PROMPT, image=low_res(), latents=latents, seed=1, **kw).images
    b = ours(PROMPT, image=low_res(), latents=latents, seed=1, **kw).images
    assert torch.equal(a, b)


def test_folder_round_trips_both_ways_with_diffusers(tmp_path, folder, ours):
    theirs = StableDiffusionUpscalePipeline.from_pretrained(folder)
    for name in ("unet", "vae"):
        assert same_weights(getattr(theirs, name), getattr(ours, name))
    assert same_weights(theirs.text_encoder.state_dict(), ours.text_encoder.model.state_dict())
    assert theirs.config.max_noise_level == 350 and type(theirs.low_res_scheduler) is DDPMScheduler
    theirs.save_pretrained(tmp_path / "theirs")
    back = Upscaler.from_pretrained(tmp_path / "theirs", device="cpu", dtype=torch.float32)
    for name in ("unet", "vae"):
        assert same_weights(getattr(back, name), getattr(ours, name))
    assert back.unet.config == ours.unet.config and back.vae.config == ours.vae.config
    assert torch.equal(back.low_res_schedule.alphas_cumprod(), ours.low_res_schedule.alphas_cumprod())
    assert back.max_noise_level == 350
    back.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["_class_name"] == \
        "StableDiffusionUpscalePipeline"


def test_a_folder_diffusers_builds_loads(tmp_path):
    """diffusers' own fast-test upscaler (their configs and initialisation), saved by diffusers, loads here bit-equal
    and samples as theirs does."""
    c = tiny_upscaler_components(seed=1)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=2, sample_size=8, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False),
        num_class_embeds=100)
    vae = DiffusersVAE(block_out_channels=[32, 32, 64], in_channels=3, out_channels=3, latent_channels=4,
                       down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                       scaling_factor=0.08333)
    text = c.text_encoder
    theirs = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text.model, tokenizer=None, unet=unet, low_res_scheduler=DDPMScheduler(),
        scheduler=DDIMScheduler(prediction_type="v_prediction"), max_noise_level=350)
    theirs.save_pretrained(tmp_path / "theirs")
    text.save_pretrained(tmp_path / "theirs")  # the tokenizer (diffusers' needs a transformers tokenizer object)
    ours = Upscaler.from_pretrained(tmp_path / "theirs", device="cpu", dtype=torch.float32)
    assert same_weights(ours.unet, unet) and same_weights(ours.vae, vae)
    assert ours.unet.config.num_class_embeds == 100 and ours.unet.config.cross_only == (True, True, False)
    from transformers import CLIPTokenizer
    theirs = StableDiffusionUpscalePipeline.from_pretrained(
        tmp_path / "theirs", tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "theirs" / "tokenizer"))
    kw = dict(image=low_res(), noise_level=20, num_inference_steps=2, guidance_scale=6.0, output_type="np")
    ref = theirs(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    got = ours(PROMPT, generator=torch.Generator().manual_seed(0), sampler="ddim", progress=False, **kw).images
    assert np.abs(got - ref).max() <= 1 / 255


def test_bad_input_is_named(ours, folder, tmp_path):
    kw = dict(num_inference_steps=2, progress=False)
    with pytest.raises(OptionError, match=r"noise_level must be an integer in \[0, 350\], got 351"):
        ours(PROMPT, image=low_res(), noise_level=351, **kw)
    with pytest.raises(ValueError, match="got 2 low-resolution images for 1 prompts"):
        ours(PROMPT, image=[low_res(), low_res()], **kw)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 8, 8\)"):
        ours(PROMPT, image=low_res(), latents=torch.zeros(1, 4, 4, 4), **kw)
    c = load_upscaler(folder)
    c.max_noise_level = 1000
    with pytest.raises(IncompatibleComponentsError, match="max_noise_level 1000 is not a timestep"):
        c.check()
    from pipelines.tiny import tiny_components
    plain = tiny_components()
    with pytest.raises(IncompatibleComponentsError, match="an upscaler's takes the VAE's 4 latent"):
        Upscaler(plain.unet, plain.vae, plain.text_encoder, plain.schedule, plain.schedule, device="cpu")
    from ldm.loading.components import save_pipeline
    save_pipeline(tmp_path / "sd", unet=plain.unet, vae=plain.vae, text_encoder=plain.text_encoder,
                  schedule=plain.schedule)
    with pytest.raises(ValueError, match="holds a 'StableDiffusionPipeline', not a StableDiffusionUpscalePipeline"):
        Upscaler.from_pretrained(tmp_path / "sd")


def test_a_vae_with_another_scaling_factor_samples_with_the_upscalers(folder, tmp_path):
    """diffusers rewrites any other scaling factor to 0.08333 (with a warning); so do we, equal images follow."""
    import dataclasses
    c = load_upscaler(folder)
    c.vae.config = dataclasses.replace(c.vae.config, scaling_factor=0.18215)
    with pytest.warns(UserWarning, match="sampling with 0.08333"):
        up = Upscaler(c.unet, c.vae, c.text_encoder, c.schedule, c.low_res_schedule, device="cpu")
    assert up.vae.config.scaling_factor == 0.08333


def test_cascade_is_the_base_then_the_upscaler_on_one_seed(ours):
    from ldm.diffusion.conditioning_augmentation import gaussian_blur
    from ldm.random import cpu_generator
    from pipelines.cascade import Cascade
    from pipelines.text_to_image import Pipeline
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)
    base = Pipeline(c.unet, c.vae, c.text_encoder, c.schedule, device="cpu", dtype=torch.float32)
    cascade = Cascade(base, ours)
    kw = dict(num_inference_steps=2, sampler="euler_ancestral", progress=False)  # ancestral: the stream goes on
    up = dict(noise_level=30, upscale_steps=2, upscale_sampler="ddim", output_type="pt")
    got = cascade(PROMPT, seed=3, blur_sigma=0.5, **kw, **up)
    assert got.seeds == [3] and got.images.shape == (1, 3, 128, 128)  # 32 px base, x4
    g = cpu_generator(3)  # by hand: the base draws from the seed's stream, the upscaler goes on from where it stopped
    low = base(PROMPT, generator=[g], output_type="pt", **kw).images
    low = ((gaussian_blur(low * 2 - 1, 0.5) + 1) / 2).clamp(0, 1)
    ref = ours(PROMPT, image=low, generator=[g], noise_level=30, num_inference_steps=2, sampler="ddim",
               output_type="pt", progress=False).images
    assert torch.equal(got.images, ref)
    batch = cascade(PROMPT, seed=3, num_images_per_prompt=2, **kw, **up)
    assert batch.seeds == [3, 4]
    torch.testing.assert_close(batch.images[:1], cascade(PROMPT, seed=3, **kw, **up).images, rtol=1e-4, atol=1e-4)
    with pytest.raises(OptionError, match="blur_sigma must be a finite number in"):
        cascade(PROMPT, blur_sigma=-1.0, **kw, **up)
    with pytest.raises(TypeError, match="must be an Upscaler"):
        Cascade(base, base)


def test_cli_generate_upscale(folder, tmp_path, capsys):
    from ldm.loading.components import save_pipeline
    from pipelines.cli import main
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)
    save_pipeline(tmp_path / "base", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    args = ["generate", PROMPT, "--model", str(tmp_path / "base"), "--upscale", str(folder), "--steps", "2",
            "--upscale-steps", "2", "--seed", "1", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main([*args, "-o", str(tmp_path / "a.png"), "--noise-level", "10"]) == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (128, 128)  # the base model's 32 px, x4
    assert main([*args, "-o", str(tmp_path / "b.png"), "--noise-level", "351"]) == 2
    assert "--noise-level must be an integer in [0, 350], got 351" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_an_upscaler_folder_is_not_a_text_to_image_model(folder):
    from pipelines.text_to_image import Pipeline

    with pytest.raises(ValueError, match="is an upscaler .* load it with pipelines.Upscaler.from_pretrained"):
        Pipeline.from_pretrained(folder)
