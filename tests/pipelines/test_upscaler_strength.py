"""Upscaler(strength < 1): the start is the low-res image upsampled (bicubic) and encoded, noised with the call's noise
to the sigma of the last int(steps * strength) steps, and only those steps run; strength 1 is diffusers' upscaler."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.loading.upscaler import save_upscaler
from pipelines.call_options import OptionError
from pipelines.tiny import tiny_upscaler_components
from pipelines.upscaler import Upscaler

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    path = tmp_path_factory.mktemp("upscaler") / "model"
    save_upscaler(path, tiny_upscaler_components(seed=0))
    return Upscaler.from_pretrained(path, device="cpu", dtype=torch.float32)


def low_res(size: int = 8) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 30, y * 30, np.where((x > 2) & (y < 5), 220, 30)], -1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def encoded_upsample(up: Upscaler) -> torch.Tensor:
    """By hand: the clean image in [-1, 1], bicubic x4, the VAE's posterior mode, scaled."""
    pixels = torch.from_numpy(np.array(low_res())).permute(2, 0, 1)[None].float() / 127.5 - 1
    high = F.interpolate(pixels, scale_factor=4, mode="bicubic").clamp(-1, 1)
    with torch.no_grad():
        return up.vae.scale_latents(up.vae.encode(high).mode())


def test_strength_one_is_the_prior_start(up):
    kw = dict(image=low_res(), noise_level=20, num_inference_steps=3, seed=2, output_type="latent", progress=False)
    assert torch.equal(up(PROMPT, strength=1.0, **kw).images, up(PROMPT, **kw).images)  # a folder's default: 1


@pytest.mark.parametrize("sampler, strength, kept", [("euler", 0.5, 2), ("dpmpp_2m", 0.3, 1), ("ddim", 0.75, 3)])
def test_start_is_the_encoded_upsample_noised_to_the_kept_steps_sigma(up, monkeypatch, sampler, strength, kept):
    steps, level = 4, 20
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    make = up.denoiser

    def spying(plan, cache=None):  # record every call's input (sigma space) and sigma
        d = make(plan, cache)
        inner = d.forward

        def forward(x, sigma, **cond):
            seen.append((x.clone(), sigma.clone()))
            return inner(x, sigma, **cond)
        d.forward = forward
        return d

    monkeypatch.setattr(up, "denoiser", spying)
    steps_run: list[int] = []
    up(PROMPT, image=low_res(), noise_level=level, num_inference_steps=steps, guidance_scale=1.0, sampler=sampler,
       strength=strength, latents=noise, generator=torch.Generator().manual_seed(1), progress=False,
       callback=lambda i, *_: steps_run.append(i))
    assert len(steps_run) == kept == int(steps * strength)
    from pipelines.sampling_run import sampling_plan
    from pipelines.call_options import check_call_options
    _, plan = sampling_plan(up.schedule, check_call_options(PROMPT, num_inference_steps=steps, sampler=sampler))
    sigma0 = plan.sigmas[steps - kept].float()  # the first sigma of the last `kept` steps
    z0 = encoded_upsample(up)
    x_first, s_first = seen[0]
    torch.testing.assert_close(s_first.float().flatten()[0], sigma0, rtol=1e-6, atol=0)
    torch.testing.assert_close(x_first, z0 + noise * sigma0, rtol=1e-5, atol=1e-5)


def test_a_lower_strength_stays_nearer_the_upsampled_image(up):
    kw = dict(image=low_res(), noise_level=0, num_inference_steps=10, guidance_scale=1.0, seed=0, sampler="euler",
              output_type="latent", progress=False)
    z0 = encoded_upsample(up)
    dist = [(up(PROMPT, strength=s, **kw).images - z0).abs().mean().item() for s in (1.0, 0.5, 0.1)]
    assert dist[0] > dist[1] > dist[2]  # random weights: the image's share of the start decides


def test_bad_strength_is_named(up):
    kw = dict(image=low_res(), num_inference_steps=4, progress=False)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(OptionError, match="strength must be a finite number in"):
            up(PROMPT, strength=bad, **kw)
    with pytest.raises(OptionError, match="leaves no step to run"):
        up(PROMPT, strength=0.2, **kw)


def test_cascade_and_cli_pass_the_strength(up, tmp_path, capsys):
    from ldm.loading.components import save_pipeline
    from ldm.random import cpu_generator
    from pipelines.cascade import Cascade
    from pipelines.cli import main
    from pipelines.text_to_image import Pipeline
    from pipelines.tiny import tiny_components

    c = tiny_components(seed=0)
    base = Pipeline(c.unet, c.vae, c.text_encoder, c.schedule, device="cpu", dtype=torch.float32)
    kw = dict(num_inference_steps=2, sampler="euler", progress=False)
    got = Cascade(base, up)(PROMPT, seed=3, upscale_steps=4, upscale_strength=0.5, upscale_sampler="euler",
                            output_type="pt", **kw).images
    g = cpu_generator(3)
    low = base(PROMPT, generator=[g], output_type="pt", **kw).images
    ref = up(PROMPT, image=low, generator=[g], num_inference_steps=4, strength=0.5, sampler="euler",
             output_type="pt", progress=False).images
    assert torch.equal(got, ref)

    save_pipeline(tmp_path / "base", unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    up.save_pretrained(tmp_path / "up")
    args = ["generate", PROMPT, "--model", str(tmp_path / "base"), "--steps", "2", "--seed", "1", "--device", "cpu",
            "--dtype", "float32", "--no-progress"]
    assert main([*args, "--upscale", str(tmp_path / "up"), "--upscale-steps", "4", "--upscale-strength", "0.5",
                 "-o", str(tmp_path / "a.png")]) == 0
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (128, 128)
    assert main([*args, "--upscale", str(tmp_path / "up"), "--upscale-strength", "0", "-o", str(tmp_path / "b.png")]) == 2
    assert "--upscale-strength must be a finite number in (0, 1]" in capsys.readouterr().err
    assert main([*args, "--upscale-strength", "0.5", "-o", str(tmp_path / "c.png")]) == 2
    assert "need --upscale" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()
