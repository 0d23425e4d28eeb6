"""CLIP guidance (GLIDE): on the analytic mixture a "CLIP" whose g(x, sigma) . h(c_k) is the exact log p(k | x_sigma),
read through ClipLogProb's VP scaling and sigma -> t lookup, turns the mixture's denoiser into component k's and its
samples into component k's (Bayes' rule); `pipe(..., clip_guidance_scale=, noisy_clip=, clip_prompt=)` on the tiny
model: scale 0 is the unguided run exactly, a positive scale raises g . h of the result, it composes with CFG and
classifier guidance, a model folder's noisy_clip/ is read lazily, and bad options are errors naming them."""

import shutil

import pytest
import torch

from ldm.diffusion.denoiser import ClassifierGuidedDenoiser, DiscreteVPDenoiser
from ldm.diffusion.samplers import sample_euler
from ldm.diffusion.schedule import t_to_sigma
from ldm.diffusion.sigma_schedules import exponential_sigmas
from ldm.diffusion.toy import GaussianMixture, mixture_2d
from ldm.networks.noisy_clip import NoisyCLIP, NoisyCLIPConfig, pooled_text
from ldm.random import seeded
from pipelines.call_options import OptionError
from pipelines.clip_guidance import ClipLogProb
from pipelines.text_to_image import Pipeline
from tests.pipelines.test_classifier_guidance import tiny_classifier

F64 = torch.float64
TABLE = torch.logspace(-3, 2.5, 1000, dtype=F64)  # a training sigma table covering sigma 0.002 .. 80


class ExactMixtureClip:
    """g(x_vp, t) = log p(. | x_sigma(t)), the mixture's log responsibilities at x = x_vp sqrt(1 + sigma(t)^2): with
    h = one-hot(k), g . h = log p(k | x_sigma), the exact classifier, reached through ClipLogProb's own path."""

    def __init__(self, gmm: GaussianMixture) -> None:
        self.gmm = gmm

    def encode_image(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t_to_sigma(t, TABLE, "log").to(x_vp.dtype)
        x = x_vp * (1 + sigma[:, None] ** 2).sqrt()
        return self.gmm._component_log_probs(x, sigma)[0].log_softmax(1)  # (B, K)


def exact_clip_log_prob(gmm: GaussianMixture, k: int, n: int) -> ClipLogProb:
    base = DiscreteVPDenoiser(lambda x, t, **c: x, TABLE)  # only its sigma -> t lookup is used
    h = torch.nn.functional.one_hot(torch.full((n,), k), len(gmm.weights)).to(F64)  # (n, K)
    return ClipLogProb(ExactMixtureClip(gmm), base, h)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_exact_clip_guidance_gives_the_class_conditional_denoiser(k) -> None:
    """D + sigma^2 grad (g . h_k) at scale 1 = E[x0 | x, c = k], component k's own denoiser (1e-10, float64)."""
    gmm = mixture_2d()
    g = torch.Generator().manual_seed(k)
    x = torch.randn(64, 2, generator=g, dtype=F64) * 3
    sigma = torch.exp(torch.empty(64, dtype=F64).uniform_(-3, 4, generator=g))
    guided = ClassifierGuidedDenoiser(gmm, exact_clip_log_prob(gmm, k, 64), scale=1.0)(x, sigma)
    component = GaussianMixture([1.0], [gmm.means[k].tolist()], [float(gmm.stds[k])])
    torch.testing.assert_close(guided, component.denoiser(x, sigma), rtol=0, atol=1e-10)


def test_clip_guided_samples_follow_bayes_rule() -> None:
    """Euler (100 steps from sigma 80, 2000 points) with the exact CLIP of component 2 at scale 1 gives N(mu_2, s_2^2):
    every sample nearest mu_2 (unguided: the share is its weight 0.2, within 0.04), mean within 0.04 (5 standard
    errors), std within 4%."""
    gmm, k = mixture_2d(), 2
    sigmas = torch.cat([exponential_sigmas(100, 0.002, 80.0).to(F64), torch.zeros(1, dtype=F64)])
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0
    plain = sample_euler(gmm, x.clone(), sigmas)
    guided = sample_euler(ClassifierGuidedDenoiser(gmm, exact_clip_log_prob(gmm, k, 2000), 1.0), x.clone(), sigmas)
    nearest = lambda s: torch.cdist(s, gmm.means).argmin(1)
    assert abs((nearest(plain) == k).double().mean().item() - float(gmm.weights[k])) < 0.04
    assert (nearest(guided) == k).all()
    torch.testing.assert_close(guided.mean(0), gmm.means[k], rtol=0, atol=0.04)
    assert guided.std(0).tolist() == pytest.approx([float(gmm.stds[k])] * 2, rel=0.04)


def tiny_clip(*, in_channels: int = 4, text_dim: int = 32, timesteps: int = 1000) -> NoisyCLIP:
    with seeded(5):
        return NoisyCLIP(NoisyCLIPConfig(in_channels=in_channels, sample_size=4, block_out_channels=(8, 16),
                                         time_embed_dim=16, norm_num_groups=4, num_train_timesteps=timesteps,
                                         text_dim=text_dim, embed_dim=8)).eval()


def similarity(pipe: Pipeline, clip: NoisyCLIP, latents: torch.Tensor, prompt: str) -> float:
    """Mean g(z0, 0) . h(prompt) over the final latents."""
    with torch.no_grad():
        pooled = pooled_text(pipe.text_encoder, [prompt] * len(latents))
        return clip(latents, torch.zeros(len(latents)), pooled).mean().item()


KW = {"num_inference_steps": 6, "seed": 0, "num_images_per_prompt": 4, "output_type": "latent", "progress": False}


def test_scale_zero_is_unguided_and_a_positive_scale_raises_the_similarity(ours) -> None:
    """Unconditional sampling toward clip_prompt: scale 0 equals the unguided run exactly (with and without a CLIP);
    scale 30 raises the mean g . h(clip_prompt) of the final latents by > 0.2 (the tiny random CLIP's cosine: about
    -0.49 unguided, 0.00 at scale 30)."""
    clip = tiny_clip()
    kw = dict(KW, guidance_scale=1.0, sampler="ddpm")
    plain = ours("", **kw).images
    assert torch.equal(ours("", clip_guidance_scale=0.0, **kw).images, plain)
    assert torch.equal(ours("", noisy_clip=clip, clip_prompt="a red circle", clip_guidance_scale=0.0, **kw).images,
                       plain)
    guided = ours("", noisy_clip=clip, clip_prompt="a red circle", clip_guidance_scale=30.0, **kw).images
    assert similarity(ours, clip, guided, "a red circle") > similarity(ours, clip, plain, "a red circle") + 0.2


def test_clip_guidance_composes_with_cfg_and_classifier_guidance(ours) -> None:
    """With CFG (h = each image's own prompt), and with CFG + classifier guidance (Euler): it runs, and changes the
    result of CFG alone."""
    clip = tiny_clip()
    prompts = ["a red circle", "a blue square"]
    kw = dict(KW, num_images_per_prompt=1, sampler="euler", guidance_scale=5.0)
    cfg = ours(prompts, **kw).images
    both = ours(prompts, noisy_clip=clip, clip_guidance_scale=20.0, **kw).images
    assert both.shape == cfg.shape and not torch.allclose(both, cfg)
    assert similarity(ours, clip, both[:1], prompts[0]) > similarity(ours, clip, cfg[:1], prompts[0])
    three = ours(prompts, noisy_clip=clip, clip_guidance_scale=20.0, classifier=tiny_classifier(), label="red",
                 classifier_scale=5.0, **kw).images
    assert torch.isfinite(three).all() and not torch.equal(three, both)


def test_a_model_folders_noisy_clip_is_read_lazily(folder, tmp_path) -> None:
    """A folder's noisy_clip/ is what noisy_clip=None uses (equal to passing it); a broken one does not stop the
    pipeline from loading or an unguided call, only a call that uses it (an error naming the file)."""
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    clip = tiny_clip()
    clip.save_pretrained(model / "noisy_clip")
    pipe = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32)
    kw = dict(KW, guidance_scale=1.0, sampler="euler", clip_prompt="a green star")
    own = pipe("", clip_guidance_scale=10.0, **kw).images
    assert torch.equal(own, pipe("", noisy_clip=clip, clip_guidance_scale=10.0, **kw).images)
    assert torch.equal(own, pipe("", noisy_clip=model / "noisy_clip", clip_guidance_scale=10.0, **kw).images)
    (model / "noisy_clip" / "model.safetensors").write_bytes(b"not weights")
    broken = Pipeline.from_pretrained(model, device="cpu", dtype=torch.float32)
    broken("", **kw)  # scale 0: never read
    with pytest.raises(Exception, match="model.safetensors"):
        broken("", clip_guidance_scale=10.0, **kw)


def test_clip_guidance_errors_name_the_problem(ours) -> None:
    kw = dict(KW, num_images_per_prompt=1, num_inference_steps=2)
    with pytest.raises(OptionError, match=r"this model has no noise-aware CLIP \(no noisy_clip/ folder\); train one "
                                          r"with python -m ldm.training.noisy_clip"):
        ours("a red circle", clip_guidance_scale=1.0, **kw)
    with pytest.raises(OptionError, match=r"clip_guidance_scale must be a finite number in \[0, inf\], got -1.0"):
        ours("a red circle", noisy_clip=tiny_clip(), clip_guidance_scale=-1.0, **kw)
    with pytest.raises(OptionError, match=r"noisy_clip takes 3-channel latents .* another model"):
        ours("a red circle", noisy_clip=tiny_clip(in_channels=3), clip_guidance_scale=1.0, **kw)
    with pytest.raises(OptionError, match="noisy_clip was trained on 500 timesteps but this model's schedule has 1000"):
        ours("a red circle", noisy_clip=tiny_clip(timesteps=500), clip_guidance_scale=1.0, **kw)
    with pytest.raises(OptionError, match="noisy_clip reads 16-wide pooled text embeddings but this model's text "
                                          "encoder gives 32"):
        ours("a red circle", noisy_clip=tiny_clip(text_dim=16), clip_guidance_scale=1.0, **kw)
    with pytest.raises(OptionError, match="clip_prompt must say what CLIP guidance guides toward"):
        ours("", noisy_clip=tiny_clip(), clip_guidance_scale=1.0, **kw)
    with pytest.raises(OptionError, match=r"clip_prompt must be a string, or one per image \(1\)"):
        ours("", noisy_clip=tiny_clip(), clip_prompt=["a", "b"], clip_guidance_scale=1.0, **kw)
    with pytest.raises(OptionError, match="noisy_clip must be a NoisyCLIP, the folder of one"):
        ours("a red circle", noisy_clip=3, clip_guidance_scale=1.0, **kw)


def test_cli_clip_guidance_flag(folder, tmp_path, capsys) -> None:
    """`ldm generate --clip-guidance S [--clip-prompt TEXT]`: runs with a folder's noisy_clip/; a model without one and
    a negative scale are one-line errors naming the flag (exit 2)."""
    from pipelines.cli import main

    fast = ["--steps", "2", "--seed", "0", "--no-progress", "--threads", "1"]
    assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--model", str(folder), *fast,
                 "--clip-guidance", "-1"]) == 2
    assert "--clip-guidance must be a finite number in [0, inf], got -1.0" in capsys.readouterr().err
    assert main(["generate", "a red circle", "-o", str(tmp_path / "a.png"), "--model", str(folder), *fast,
                 "--clip-guidance", "5"]) == 2
    err = capsys.readouterr().err
    assert "--clip-guidance 5 > 0, but this model has no noise-aware CLIP (no noisy_clip/ folder)" in err
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    tiny_clip().save_pretrained(model / "noisy_clip")
    assert main(["generate", "a red circle", "-o", str(tmp_path / "b.png"), "--model", str(model), *fast,
                 "--clip-guidance", "5", "--clip-prompt", "a blue square"]) == 0
    assert (tmp_path / "b.png").is_file() and not (tmp_path / "a.png").exists()


def test_the_bundled_noisy_clip_fits_the_bundled_model() -> None:
    """Pipeline() has a noisy_clip/ (read lazily): it matches the bundled model's latents, schedule and pooled text
    width; scale 0 equals the unguided run exactly and a positive scale changes it (Euler, 2 steps)."""
    from ldm.loading.sources import DEFAULT_MODEL
    from pipelines.clip_guidance import check_clip_guidance

    pipe = Pipeline(device="cpu", dtype=torch.float32)
    assert pipe.model_folder == DEFAULT_MODEL and (DEFAULT_MODEL / "noisy_clip" / "model.safetensors").is_file()
    guide = check_clip_guidance(pipe, None, 2.0, "a red circle", ["", ""])
    assert guide is not None and guide.clip.config.text_dim == 64 and guide.prompts == ["a red circle"] * 2
    kw = {"guidance_scale": 1.0, "num_inference_steps": 2, "seed": 0, "output_type": "latent", "progress": False,
          "clip_prompt": "a red circle"}
    plain = pipe("", **kw).images
    assert torch.equal(pipe("", clip_guidance_scale=0.0, **kw).images, plain)
    assert not torch.allclose(pipe("", clip_guidance_scale=30.0, **kw).images, plain)
