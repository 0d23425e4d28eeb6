"""DeepCache through the Pipeline (`cache_interval`, `cache_depth`) against diffusers' StableDiffusionPipeline with the
DeepCache package's DeepCacheSDHelper on identical tiny random weights, latents and scheduler; its contracts with the
guidance interval, img2img and every sampler; and the CLI flags."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
)

from ldm.diffusion.samplers import SAMPLERS
from pipelines.cli import main
from tests.pipelines._parity import PROMPTS, SAMPLER_SCHEDULERS, SCALE, _compare_with_diffusers, _init_image


class _deepcache:
    """DeepCacheSDHelper enabled on a diffusers pipeline for a `with` block (its state starts afresh)."""

    def __init__(self, pipe, interval: int, depth: int):
        self.helper = pytest.importorskip("DeepCache").DeepCacheSDHelper(pipe)  # the test extra installs it
        self.helper.set_params(cache_interval=interval, cache_branch_id=depth)

    def __enter__(self):
        self.helper.enable()

    def __exit__(self, *exc):
        self.helper.disable()


def _full_calls(ours):
    """Per U-Net call: (batch, whether the mid block ran, i.e. a full call); and a function removing the hooks."""
    calls = []
    pre = ours.unet.register_forward_pre_hook(lambda m, args: calls.append([args[0].shape[0], False]))
    mid = ours.unet.mid_block.register_forward_hook(lambda *a: calls[-1].__setitem__(1, True))
    return calls, lambda: (pre.remove(), mid.remove())


# the tiny U-Net has two blocks of two resnets: 6 skip branches; 4 is DeepCache's (block 1, layer 1)
@pytest.mark.parametrize("interval, depth", [(2, 0), (3, 4)])
@pytest.mark.parametrize("sampler, scheduler_cls", [*SAMPLER_SCHEDULERS, ("ddpm", DDPMScheduler)])
def test_images_equal_diffusers_with_the_deepcache_package(ours, theirs, sampler, scheduler_cls, interval, depth):
    """One U-Net call per step (guidance batched): our call count is DeepCache's step index, so equal within 1/255."""
    with _deepcache(theirs, interval, depth):
        got = _compare_with_diffusers(ours, theirs, sampler, scheduler_cls, cache_interval=interval,
                                      cache_depth=depth)
    plain = _compare_with_diffusers(ours, theirs, sampler, scheduler_cls)
    assert np.abs(got - plain).max() > 2 / 255  # caching changes the images, so the comparison above can fail


def test_img2img_equals_diffusers_with_the_deepcache_package(ours, theirs, monkeypatch):
    """Counting starts at the first step run (DeepCache: the first timestep it sees), as test_img2img_equals_diffusers
    sets it up otherwise (diffusers' posterior sample patched to its mode)."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module

    monkeypatch.setattr(img2img_module, "retrieve_latents", lambda out, generator=None, **k: out.latent_dist.mode())
    pipe = StableDiffusionImg2ImgPipeline(**{**theirs.components, "scheduler": DDIMScheduler.from_config(
        theirs.scheduler.config)})
    kw = dict(num_inference_steps=10, strength=0.6, guidance_scale=SCALE, output_type="np")
    with _deepcache(pipe, 3, 1):
        ref = pipe(PROMPTS[0], image=_init_image(), generator=torch.Generator().manual_seed(2), **kw).images
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    mine = dict(image=_init_image(), latents=noise, sampler="ddim", progress=False, **kw)
    got = ours(PROMPTS[0], cache_interval=3, cache_depth=1, **mine).images
    assert np.abs(got - ref).max() <= 1 / 255, f"max abs pixel difference {np.abs(got - ref).max():.2e}"
    assert np.abs(got - ours(PROMPTS[0], **mine).images).max() > 2 / 255


def test_interval_one_and_none_are_the_plain_run_and_no_state_outlives_a_call(ours):
    kw = dict(num_inference_steps=4, sampler="euler", height=32, width=32, seed=0, output_type="latent", progress=False)
    plain = ours(PROMPTS, **kw).images
    assert torch.equal(ours(PROMPTS, cache_interval=1, **kw).images, plain)
    assert torch.equal(ours(PROMPTS, cache_interval=None, cache_depth=3, **kw).images, plain)
    cached = ours(PROMPTS, cache_interval=2, **kw).images
    assert torch.equal(ours(PROMPTS, cache_interval=2, **kw).images, cached)  # a fresh cache per call
    assert not torch.equal(cached, plain)


def test_guidance_interval_edges_run_in_full(ours):
    """Outside the guidance interval only the conditional branch runs (batch 1, not 2): the call after each switch
    is full, and no call reuses a feature of the other batch (that would raise a shape error)."""
    kw = dict(num_inference_steps=6, sampler="euler", height=32, width=32, seed=0, output_type="latent", progress=False)
    sigmas = []
    ours(PROMPTS[0], guidance_scale=3.0, callback=lambda i, s, x, x0: sigmas.append(s), **kw)
    calls, remove = _full_calls(ours)
    try:
        ours(PROMPTS[0], guidance_scale=3.0, guidance_interval=(sigmas[4], sigmas[1]), cache_interval=3, **kw)
    finally:
        remove()
    # calls 0 and 3: the schedule's; 1 and 4: the batch changed; 2 and 5 reuse the feature of their own batch
    assert calls == [[1, True], [2, True], [2, False], [2, True], [1, True], [1, False]]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_counts_network_calls(ours, sampler):
    """Call i is full when i % interval == 0, whatever a step's number of calls (heun: two)."""
    kw = dict(num_inference_steps=4, height=32, width=32, seed=0, output_type="latent", progress=False)
    calls, remove = _full_calls(ours)
    try:
        out = ours(PROMPTS[0], sampler=sampler, cache_interval=2, cache_depth=2, **kw).images
    finally:
        remove()
    assert len(calls) >= 4 and (sampler != "heun" or len(calls) == 7)  # heun: 2 calls a step, Euler on the last
    assert [full for _, full in calls] == [i % 2 == 0 for i in range(len(calls))]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"cache_interval": 0}, r"cache_interval must be an integer >= 1 \(1: no caching\), got 0"),
    ({"cache_interval": 2.5}, r"cache_interval must be an integer >= 1"),
    ({"cache_interval": True}, r"cache_interval must be an integer >= 1"),
    ({"cache_interval": 3, "cache_depth": -1}, r"cache_depth must be an integer >= 0, got -1"),
    ({"cache_interval": 3, "cache_depth": 6}, r"cache_depth must be an integer in \[0, 5\] \(this U-Net has 6 skip"),
    ({"cache_depth": 6}, r"cache_depth must be an integer in \[0, 5\]"),  # refused even with caching off
])  # fmt: skip
def test_bad_cache_settings_are_named(ours, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ours(PROMPTS[0], num_inference_steps=2, progress=False, output_type="latent", **kwargs)


def test_cli_cache_flags(folder, tmp_path, capsys):
    fast = ["--steps", "3", "--no-progress", "--device", "cpu", "--seed", "0", "--model", str(folder)]
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert main(["generate", PROMPTS[0], "-o", str(a), *fast]) == 0
    assert main(["generate", PROMPTS[0], "-o", str(b), *fast, "--cache-interval", "1", "--cache-depth", "3"]) == 0
    assert main(["generate", PROMPTS[0], "-o", str(c), *fast, "--cache-interval", "2"]) == 0
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    capsys.readouterr()
    assert main(["generate", PROMPTS[0], "-o", str(c), *fast, "--cache-interval", "0"]) == 2
    assert "--cache-interval must be an integer >= 1 (1: no caching), got 0" in capsys.readouterr().err
    assert main(["generate", PROMPTS[0], "-o", str(c), *fast, "--cache-interval", "3", "--cache-depth", "6"]) == 2
    assert "--cache-depth must be an integer in [0, 5] (this U-Net has 6 skip branches), got 6" in capsys.readouterr().err
