"""Precision and compilation options of the Pipeline: bf16 networks with fp32 sampling, the fp16 VAE with its fp32
fallback, channels-last VAE on the CPU, and pipe.compile()."""

import copy
import warnings

import numpy as np
import pytest
import torch

from pipelines.text_to_image import Pipeline


@pytest.fixture()
def pipe(folder):
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def _run(pipe, **kw):
    return pipe(["a red circle", "a blue square"], num_inference_steps=4, seed=3, output_type="np", progress=False,
                **kw)


def test_bf16_networks_with_fp32_latents_stay_close_to_fp32(pipe):
    ref = _run(pipe)
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16
    seen = []
    out = _run(pipe, callback=lambda i, s, x, x0: seen.append((x.dtype, x0.dtype)))
    assert set(seen) == {(torch.float32, torch.float32)}  # the sampler's arithmetic stays fp32
    assert out.latents.dtype == torch.float32
    rel = (out.latents - ref.latents).norm() / ref.latents.norm()
    assert 0 < rel < 3e-2, rel  # bf16 has an 8-bit mantissa: ~1e-2, and it is not fp32
    assert np.abs(out.images - ref.images).mean() < 1e-2


def test_the_vae_is_channels_last_on_the_cpu_with_the_same_image(pipe):
    conv = pipe.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert pipe.unet.conv_in.weight.is_contiguous()  # the U-Net is not: slower in bf16
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fast = pipe.decode(z)
    pipe.vae.to(memory_format=torch.contiguous_format)
    assert torch.allclose(fast, pipe.decode(z), atol=1e-5)


def test_compile_keeps_the_modules_and_the_image(pipe):
    ref = _run(pipe)
    assert pipe.compile(backend="eager") is pipe
    unet_type = type(pipe.unet)
    out = _run(pipe)
    assert type(pipe.unet) is unet_type  # compiled in place: loading, saving and LoRA see the same module
    assert torch.allclose(out.latents, ref.latents, atol=1e-5)


def test_fp16_vae_decodes_in_fp16_like_diffusers(pipe):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe.decode(z)
    pipe.to(dtype=torch.float16)
    assert pipe.vae.dtype == torch.float16  # not kept in fp32: half the decoder's memory, as diffusers' SD pipeline
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow here, so no fallback
        out = pipe.decode(z)
    assert pipe.vae.dtype == torch.float16
    assert (out - ref).abs().max() < 1e-2  # fp16's 11-bit mantissa through a tiny decoder


def test_an_fp16_overflow_reruns_in_fp32_and_keeps_the_vae_there(pipe):
    with torch.no_grad():  # activations past fp16's 65504 in the first conv (weights 6e4, exact in fp16): inf, nan
        pipe.vae.decoder.conv_in.weight.fill_(6e4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe.to(dtype=torch.float16)
    reference = copy.deepcopy(pipe.vae).float()  # the same fp16-rounded weights, in fp32
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode(z.half())).all()  # the overflow is real
        expected = (reference.decode(reference.unscale_latents(z)).float() / 2 + 0.5).clamp(0, 1)
    with pytest.warns(UserWarning, match="overflowed in float16"):
        out = pipe.decode(z)
    assert pipe.vae.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.allclose(out, expected, atol=1e-6)
    pipe.to(dtype=torch.float16)  # moving the pipeline tries fp16 again
    assert pipe.vae.dtype == torch.float16
