"""Inpainting (pipelines/inpaint.py): an inpainting U-Net (9 input channels) and an ordinary one (re-noising the known
region) against diffusers' StableDiffusionInpaintPipeline on the same tiny weights; the mask as diffusers' mask
processor reads it; closed-form invariants of the re-noising; errors; loading and saving both ways; the CLI's --mask.

diffusers SAMPLES the VAE posterior with the generator where we take its mode: its `retrieve_latents` is patched to
return the mode (as tests/pipelines/test_pipeline.py does for img2img), so its generator draws only the noise, the
same torch.randn of the latent shape that we pass as `latents`."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionInpaintPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from ldm.config import BUNDLED_CONFIGS, load_config
from ldm.loading.components import save_pipeline
from ldm.networks.unet import UNet, UNetConfig
from ldm.random import seeded
from pipelines.inpaint import prepare_mask
from pipelines.text_to_image import Pipeline
from pipelines.tiny import tiny_components
from tests.pipelines._parity import PROMPTS

TOL = 1 / 255  # max abs pixel difference to diffusers (images in [0, 1])
SCHEDULERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpmpp_2m": DPMSolverMultistepScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler}


def _image(height: int = 32, width: int = 32) -> Image.Image:
    """An image with structure (gradients and a block), so the comparison has something to get wrong."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.where((x > 8) & (x < 20) & (y > 10), 230, 20)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _mask(height: int = 32, width: int = 32) -> Image.Image:
    """White (repaint) on a block that is not aligned to the 8-pixel latent grid, black (keep) elsewhere."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray((((x > 12) & (y > 5) & (y < height - 6)) * 255).astype(np.uint8))


def _unet9(seed: int = 5) -> UNet:
    with seeded(seed):
        return UNet(dataclasses.replace(load_config(UNetConfig, BUNDLED_CONFIGS / "unet-tiny.yaml"), in_channels=9))


@pytest.fixture(scope="module")
def folder9(tmp_path_factory):
    """The tiny model with a 9-channel (inpainting) U-Net, written by us."""
    c = tiny_components(seed=0)
    path = tmp_path_factory.mktemp("tiny_inpaint") / "model"
    save_pipeline(path, unet=_unet9().eval(), vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    return path


@pytest.fixture(scope="module")
def pair9(folder9):
    ours = Pipeline.from_pretrained(folder9, device="cpu", dtype=torch.float32)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(folder9, safety_checker=None, requires_safety_checker=False)
    return ours, theirs


@pytest.fixture
def mode_posterior(monkeypatch):
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module

    monkeypatch.setattr(inpaint_module, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())


def _compare(ours, theirs, sampler, *, prompt=PROMPTS[0], height=32, width=32, steps=4, **kw):
    """diffusers' image and ours on the same weights, image, mask, noise and scheduler; returns (ours, theirs)."""
    theirs.scheduler = SCHEDULERS[sampler].from_config(theirs.scheduler.config)
    n = len(prompt) if isinstance(prompt, list) else 1
    args = dict(image=_image(height, width), mask_image=_mask(height, width), num_inference_steps=steps,
                output_type="np", height=height, width=width, **kw)  # diffusers' default: the U-Net's sample size
    ref = theirs(prompt, generator=torch.Generator().manual_seed(2), **args).images
    generator = torch.Generator().manual_seed(2)  # the noise, then (ancestral samplers) the steps' draws
    noise = torch.randn(n, 4, height // 8, width // 8, generator=generator)
    got = ours(prompt, latents=noise, generator=generator, sampler=sampler, progress=False, **args).images
    assert got.shape == ref.shape == (n, height, width, 3)
    assert np.abs(got - ref).max() <= TOL, f"{sampler}: max abs pixel difference {np.abs(got - ref).max():.2e}"
    return got, ref


CASES = [  # sampler, strength, guidance, negative prompt, (height, width), prompts
    ("euler", 1.0, 7.5, None, (32, 32), PROMPTS[0]),
    ("ddim", 0.6, 3.0, "blurry", (32, 48), PROMPTS[0]),
    ("dpmpp_2m", 1.0, 1.0, None, (48, 32), PROMPTS),
    ("dpmpp_2m", 0.75, 12.0, "two green stars", (32, 32), PROMPTS[1]),
]


@pytest.mark.parametrize("sampler, strength, scale, negative, size, prompt", CASES)
def test_an_inpainting_unet_equals_diffusers(pair9, mode_posterior, sampler, strength, scale, negative, size, prompt):
    """9 channels: [latents, mask, masked-image latents]; within 1/255 (measured ~3e-6) at several guidance scales (1:
    no guidance), a negative prompt, strength < 1 and = 1, non-square sizes and two prompts with one mask."""
    ours, theirs = pair9
    got, _ = _compare(ours, theirs, sampler, prompt=prompt, height=size[0], width=size[1], strength=strength,
                      guidance_scale=scale, negative_prompt=negative)
    if sampler != "euler":
        return
    # the mask matters, so the comparison can fail: all-keep gives another image
    keep = Image.new("L", (size[1], size[0]), 0)
    noise = torch.randn(got.shape[0], 4, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(2))
    other = ours(prompt, image=_image(*size), mask_image=keep, latents=noise, sampler=sampler, strength=strength,
                 guidance_scale=scale, negative_prompt=negative, num_inference_steps=4, output_type="np",
                 progress=False).images
    assert np.abs(other - got).max() > 0.01


@pytest.mark.parametrize("sampler, strength", [("euler", 1.0), ("ddim", 0.6), ("dpmpp_2m", 1.0),
                                               ("euler_ancestral", 0.75), ("heun", 0.7)])
def test_renoising_an_ordinary_unet_equals_diffusers(ours, theirs, mode_posterior, sampler, strength):
    """A 4-channel U-Net in diffusers' inpainting pipeline blends z0 noised to the next timestep into the known region
    after each step (heun: after each half step); ours re-noises the known region of the network's input
    (RenoiseKnown), the same images within 1/255 (measured ~3e-6, heun ~8e-6) as every sampler's step is elementwise,
    ancestral ones included (same generator)."""
    pipe = StableDiffusionInpaintPipeline(**theirs.components)
    got, _ = _compare(ours, pipe, sampler, strength=strength, guidance_scale=7.5)
    if sampler != "ddim":
        return
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    img2img = ours(PROMPTS[0], image=_image(), latents=noise, sampler=sampler, strength=strength,
                   num_inference_steps=4, output_type="np", progress=False).images
    assert np.abs(img2img - got).max() > 0.01  # the mask matters


def _z0(pipe: Pipeline) -> torch.Tensor:
    from pipelines.images import from_image
    from pipelines.inpaint import encode

    return encode(pipe.vae, from_image(_image()), pipe.device)


def test_the_known_region_is_the_renoised_original_at_every_step(ours):
    """Closed forms of the re-noising: at every step after the first the network sees, in the known region,
    (z0 + sigma n) / sqrt(1 + sigma^2) (its VP input; the first step sees the prior's noise, as in diffusers); the
    result's known region is z0 exactly; an all-keep mask at strength 1 returns z0 exactly, and an all-repaint mask is
    text-to-image exactly (the blend multiplies by 1 and 0)."""
    from pipelines.inpaint import latent_mask

    z0 = _z0(ours)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    from ldm.diffusion.samplers import SAMPLERS

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    unet_forward = ours.unet.forward

    def spy(sample, t, *args, **kwargs):
        seen.append((sample[:1].clone(), t[:1].clone()))  # the unconditional half's input, and its timestep
        return unet_forward(sample, t, *args, **kwargs)

    kw = dict(num_inference_steps=4, sampler="euler", output_type="latent", progress=False, latents=noise)
    ours.unet.forward = spy
    try:
        out = ours(PROMPTS[0], image=_image(), mask_image=_mask(), **kw).images
    finally:
        del ours.unet.forward
    keep = latent_mask(prepare_mask(_mask(), (32, 32), 32, 32), 8) == 0  # (1, 1, 4, 4)
    keep = keep.expand_as(z0)
    assert 0 < int(keep.sum()) < keep.numel()
    sigmas = SAMPLERS["euler"].plan(ours.schedule, 4).sigmas.float()  # step i's network call is at sigmas[i]
    assert len(seen) == 4
    for (x_vp, _), sigma in zip(seen[1:], sigmas[1:]):
        expected = (z0 + sigma * noise) / (1 + sigma**2).sqrt()
        torch.testing.assert_close(x_vp[keep], expected[keep], rtol=0, atol=1e-6)  # fp32 rounding
    prior = SAMPLERS["euler"].plan(ours.schedule, 4).prior_scale  # the first step sees the prior, blended nowhere
    torch.testing.assert_close(seen[0][0], noise * prior / (1 + sigmas[0] ** 2).sqrt(), rtol=0, atol=1e-6)
    assert torch.equal(out[keep], z0[keep])
    assert (out[~keep] - z0[~keep]).abs().max() > 0.1

    all_keep = ours(PROMPTS[0], image=_image(), mask_image=Image.new("L", (32, 32), 0), **kw).images
    assert torch.equal(all_keep, z0)
    all_repaint = ours(PROMPTS[0], image=_image(), mask_image=Image.new("L", (32, 32), 255), **kw).images
    text2img = ours(PROMPTS[0], height=32, width=32, **kw).images
    assert torch.equal(all_repaint, text2img)


def test_the_mask_is_read_as_diffusers_mask_processor_reads_it():
    """PIL masks in L / RGB / 1 modes, resized (Lanczos) or not; float arrays and tensors resized nearest: equal to
    diffusers' mask processor exactly. uint8 arrays and RGB tensors (which diffusers does not read as masks) equal the
    PIL path."""
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    gray = _mask(32, 48).filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(3))  # grey edges to binarize
    for mask in (gray, gray.convert("RGB"), _mask(32, 48).convert("1")):
        for h, w in ((32, 48), (40, 64), (24, 24)):
            got = prepare_mask(mask, (32, 48), h, w)
            assert torch.equal(got, processor.preprocess(mask, height=h, width=w)), (mask.mode, h, w)
    array = np.asarray(gray, dtype=np.float32) / 255
    for h, w in ((32, 48), (16, 96)):
        assert torch.equal(prepare_mask(array, (32, 48), h, w), processor.preprocess(array, height=h, width=w))
        tensor = torch.from_numpy(array)[None, None]
        assert torch.equal(prepare_mask(tensor, (32, 48), h, w), processor.preprocess(tensor, height=h, width=w))
    pil = prepare_mask(gray, (32, 48), 32, 48)
    assert 0 < pil.mean() < 1 and set(pil.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(prepare_mask(np.asarray(gray), (32, 48), 32, 48), pil)  # uint8 array
    rgb = torch.from_numpy(np.asarray(gray.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    assert torch.equal(prepare_mask(rgb, (32, 48), 32, 48), prepare_mask(gray.convert("RGB"), (32, 48), 32, 48))
    assert torch.equal(prepare_mask(torch.from_numpy(array) >= 0.5, (32, 48), 32, 48), pil)  # bool


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (32, 24)), "mask_image is 24 x 32 .* but the image is 32 x 32"),
    (np.zeros((32, 24), np.float32), "mask_image is 32 x 24 .* but the image is 32 x 32"),
    (torch.full((1, 1, 32, 32), 255.0), r"values in \[0, 1\].*max 255"),
    (torch.full((32, 32), -0.5), r"values in \[0, 1\].*min -0.5"),
    (np.full((32, 32), np.nan, np.float32), r"values in \[0, 1\]"),
    (np.zeros((32, 32, 2), np.uint8), r"must be \(H, W\), \(H, W, 1\) or \(H, W, 3\)"),
    (torch.zeros(1, 2, 32, 32), r"must be \(H, W\), \(N, H, W\) or \(N, 1 or 3, H, W\)"),
    (torch.zeros(32, 32, dtype=torch.int64), "float in \\[0, 1\\] or bool"),
    (torch.zeros(3, 1, 32, 32), "got 3 masks for 1 outputs"),
    ("mask.png", "mask_image must be a PIL image"),
])
def test_a_bad_mask_is_refused_by_name(ours, mask, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ours(PROMPTS[0], image=_image(), mask_image=mask, num_inference_steps=2, progress=False)


def test_misuse_is_refused_before_any_network_runs(ours, pair9):
    from pipelines.call_options import OptionError

    with pytest.raises(OptionError, match="mask_image needs an image to inpaint"):
        ours(PROMPTS[0], mask_image=_mask(), num_inference_steps=2)
    inpainting = pair9[0]
    for kwargs in ({}, {"image": _image()}):
        with pytest.raises(ValueError, match="takes 9 input channels .* pass image= and mask_image="):
            inpainting(PROMPTS[0], num_inference_steps=2, height=32, width=32, **kwargs)


def test_strength_defaults_to_one_with_a_mask(ours):
    """diffusers' defaults: 1.0 for its inpainting pipeline, 0.8 for its img2img pipeline."""
    kw = dict(image=_image(), num_inference_steps=3, sampler="euler", output_type="latent", progress=False,
              latents=torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)))
    default = ours(PROMPTS[0], mask_image=_mask(), **kw).images
    assert torch.equal(default, ours(PROMPTS[0], mask_image=_mask(), strength=1.0, **kw).images)
    assert not torch.equal(default, ours(PROMPTS[0], mask_image=_mask(), strength=0.8, **kw).images)
    assert torch.equal(ours(PROMPTS[0], **kw).images, ours(PROMPTS[0], strength=0.8, **kw).images)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_inpainting_folder_loads_and_saves_back_both_ways(pair9, tmp_path):
    """Ours -> diffusers' StableDiffusionInpaintPipeline (model_index names it) with bit-equal weights; diffusers'
    save_pretrained -> ours, again bit-equal."""
    ours, theirs = pair9
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    back = StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "ours", safety_checker=None,
                                                          requires_safety_checker=False)
    assert back.unet.config.in_channels == 9
    assert _same(back.unet.state_dict(), ours.unet.state_dict())
    assert _same(back.vae.state_dict(), ours.vae.state_dict())
    theirs.save_pretrained(tmp_path / "theirs")
    again = Pipeline.from_pretrained(tmp_path / "theirs", device="cpu", dtype=torch.float32)
    assert again.unet.config.in_channels == 9 and _same(again.unet.state_dict(), theirs.unet.state_dict())


def test_a_single_file_inpainting_checkpoint_loads(pair9, folder9, tmp_path):
    """Our CompVis-layout single file of the 9-channel model reads back bit-exact (from its metadata, and without it
    from a config folder), and diffusers' from_single_file reads the same U-Net from it."""
    from safetensors.torch import load_file, save_file

    from ldm.loading.single_file import (
        checkpoint_family,
        load_single_file,
        save_single_file,
    )

    ours, _ = pair9
    path = tmp_path / "inpaint.safetensors"
    save_single_file(ours.components, path)
    assert checkpoint_family(load_file(path)) == "SD 1.x inpainting"
    assert _same(load_single_file(path).unet.state_dict(), ours.unet.state_dict())
    save_file(load_file(path), tmp_path / "bare.safetensors")  # no metadata: the configs come from the folder
    bare = load_single_file(tmp_path / "bare.safetensors", config_folder=folder9)
    assert bare.unet.config.in_channels == 9 and _same(bare.unet.state_dict(), ours.unet.state_dict())
    theirs = StableDiffusionInpaintPipeline.from_single_file(str(path), config=str(folder9), local_files_only=True,
                                                             safety_checker=None)
    assert _same(theirs.unet.state_dict(), ours.unet.state_dict())


def test_a_single_file_inpainting_checkpoint_without_configs_takes_the_preset_with_nine_channels(pair9, tmp_path,
                                                                                               monkeypatch):
    """No metadata, no config folder: the SD 1.x preset (here shrunk to the tiny sizes) with in_channels 9, read off
    the 9-channel conv_in; the weights load bit-exact."""
    from safetensors.torch import load_file, save_file

    from ldm.loading import single_file

    tiny = {"unet-sd15.yaml": "unet-tiny.yaml", "vae-sd.yaml": "vae-tiny.yaml"}
    load = single_file.load_config
    monkeypatch.setattr(single_file, "load_config", lambda cls, path: load(cls, path.parent / tiny[path.name]))
    monkeypatch.setattr(single_file, "SD1_TEXT", dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                                      num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32))
    ours, _ = pair9
    single_file.save_single_file(ours.components, tmp_path / "with_meta.safetensors")
    save_file(load_file(tmp_path / "with_meta.safetensors"), tmp_path / "bare.safetensors")
    got = single_file.load_single_file(tmp_path / "bare.safetensors")
    assert got.unet.config.in_channels == 9 and _same(got.unet.state_dict(), ours.unet.state_dict())


def test_generate_with_mask_in_the_cli(folder9, tmp_path, capsys):
    """`ldm generate --image I --mask M` runs the inpainting model; --mask needs --image; a mask of another size is a
    usage error naming it."""
    from pipelines.cli import main

    _image().save(tmp_path / "init.png")
    _mask().convert("RGB").save(tmp_path / "mask.png")
    Image.new("L", (16, 16)).save(tmp_path / "small.png")
    base = ["generate", PROMPTS[0], "--model", str(folder9), "--steps", "2", "--no-progress", "--device", "cpu",
            "--seed", "1"]
    out = tmp_path / "out.png"
    init, mask = str(tmp_path / "init.png"), str(tmp_path / "mask.png")
    assert main([*base, "-o", str(out), "--image", init, "--mask", mask]) == 0
    with Image.open(out) as im:
        assert im.size == (32, 32)
    assert main([*base, "-o", str(out), "--mask", mask]) == 2
    assert "--mask needs --image" in capsys.readouterr().err
    assert main([*base, "-o", str(out), "--image", init, "--mask", str(tmp_path / "small.png")]) == 2
    assert "mask_image is 16 x 16" in capsys.readouterr().err


def test_an_sdxl_inpainting_folder_equals_diffusers_and_saves_back(monkeypatch, tmp_path):
    """A tiny SDXL with a 9-channel U-Net written by diffusers' StableDiffusionXLInpaintPipeline (tests/pipelines/
    _sdxl.py): the same images within 1/255 (measured ~2e-6) at strength 1 and < 1 with a negative prompt; saved back
    by us, diffusers loads it as StableDiffusionXLInpaintPipeline with bit-equal weights."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as sdxl_inpaint
    from diffusers import StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    from tests.pipelines._sdxl import SDXL_UNET, diffusers_sdxl

    monkeypatch.setattr(sdxl_inpaint, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())
    base = diffusers_sdxl(tmp_path, 0)
    torch.manual_seed(3)
    unet = UNet2DConditionModel.from_config(dataclasses.replace(SDXL_UNET, in_channels=9).to_diffusers()).eval()
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                           "scheduler")}
    theirs = StableDiffusionXLInpaintPipeline(unet=unet, force_zeros_for_empty_prompt=True, **parts)
    theirs.save_pretrained(tmp_path / "inpaint")
    ours = Pipeline.from_pretrained(tmp_path / "inpaint", device="cpu", dtype=torch.float32)
    for strength, scale, negative in ((1.0, 5.0, None), (0.6, 3.0, "blurry")):
        kw = dict(image=_image(), mask_image=_mask(), num_inference_steps=4, guidance_scale=scale, strength=strength,
                  negative_prompt=negative, height=32, width=32, output_type="np")
        ref = theirs(PROMPTS[0], generator=torch.Generator().manual_seed(2), **kw).images
        noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        got = ours(PROMPTS[0], latents=noise, sampler="euler", progress=False, **kw).images
        assert np.abs(got - ref).max() <= TOL, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    ours.save_pretrained(tmp_path / "back")
    index = json.loads((tmp_path / "back" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLInpaintPipeline"
    back = StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "back")
    assert _same(back.unet.state_dict(), unet.state_dict())
