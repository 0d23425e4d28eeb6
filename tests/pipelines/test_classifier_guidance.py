"""Classifier guidance: on the analytic mixture the exact classifier p(k | x_sigma) turns the mixture's denoiser into
component k's (Bayes' rule: grad log p(x | k) = grad log p(x) + grad log p(k | x)) and its samples into component k's;
`pipe(..., classifier=, classifier_scale=, label=)` runs on the tiny model, unconditional included, and bad options
are errors naming them."""

import pytest
import torch

from ldm.diffusion.denoiser import ClassifierGuidedDenoiser
from ldm.diffusion.samplers import sample_euler
from ldm.diffusion.sigma_schedules import exponential_sigmas
from ldm.diffusion.toy import GaussianMixture, mixture_2d
from ldm.networks.classifier import ClassifierConfig, NoisyClassifier
from ldm.random import seeded
from pipelines.call_options import OptionError
from pipelines.guidance_options import ClassifierLogProb

F64 = torch.float64


def exact_classifier(gmm: GaussianMixture, k: int):
    """log p(k | x_sigma) = log w_k N(x; mu_k, s_k^2 + sigma^2) - log p_sigma(x), the mixture's responsibilities."""
    return lambda x, sigma, **cond: gmm._component_log_probs(x, sigma)[0].log_softmax(1)[:, k]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_exact_classifier_guidance_gives_the_class_conditional_denoiser(k) -> None:
    """D + sigma^2 grad log p(k | x) at scale 1 = E[x0 | x, y = k], the denoiser of component k alone (1e-10)."""
    gmm = mixture_2d()
    g = torch.Generator().manual_seed(k)
    x = torch.randn(64, 2, generator=g, dtype=F64) * 3
    sigma = torch.exp(torch.empty(64, dtype=F64).uniform_(-3, 4, generator=g))
    guided = ClassifierGuidedDenoiser(gmm, exact_classifier(gmm, k), scale=1.0)(x, sigma)
    component = GaussianMixture([1.0], [gmm.means[k].tolist()], [float(gmm.stds[k])])
    torch.testing.assert_close(guided, component.denoiser(x, sigma), rtol=0, atol=1e-10)


def test_guided_samples_follow_bayes_rule() -> None:
    """Sampling (Euler, 100 steps from sigma 80) with the exact classifier of component 1 at scale 1 gives its
    N(mu_1, s_1^2): mean within 0.04 (5 standard errors of 2000 samples), std within 4%; unguided, the share of
    samples nearest mu_1 is its weight 0.3 (within 0.04), guided it is 1."""
    gmm, k = mixture_2d(), 1
    sigmas = torch.cat([exponential_sigmas(100, 0.002, 80.0).to(F64), torch.zeros(1, dtype=F64)])
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0

    def nearest(samples: torch.Tensor) -> torch.Tensor:
        return torch.cdist(samples, gmm.means).argmin(1)

    plain = sample_euler(gmm, x.clone(), sigmas)
    guided = sample_euler(ClassifierGuidedDenoiser(gmm, exact_classifier(gmm, k), scale=1.0), x.clone(), sigmas)
    assert abs((nearest(plain) == k).double().mean().item() - float(gmm.weights[k])) < 0.04
    assert (nearest(guided) == k).all()
    torch.testing.assert_close(guided.mean(0), gmm.means[k], rtol=0, atol=0.04)
    assert guided.std(0).tolist() == pytest.approx([float(gmm.stds[k])] * 2, rel=0.04)


def tiny_classifier(in_channels: int = 4) -> NoisyClassifier:
    with seeded(3):
        return NoisyClassifier(ClassifierConfig(in_channels=in_channels, sample_size=4, labels=("red", "green", "blue"),
                                                block_out_channels=(8, 16), time_embed_dim=16,
                                                norm_num_groups=4)).eval()


def label_log_prob(classifier: NoisyClassifier, latents: torch.Tensor, label: int) -> float:
    with torch.no_grad():
        return classifier(latents, torch.zeros(len(latents))).log_softmax(1)[:, label].mean().item()


def test_pipeline_classifier_option_runs_and_guides(ours) -> None:
    """Unconditional (empty prompt, guidance 1) DDPM on the tiny model, as the paper samples: scale 0 is the unguided
    run exactly; scale 20 raises the classifier's mean log p(label | final latents) above the unguided run's. With CFG
    and a label per image (Euler) it runs too."""
    classifier = tiny_classifier()
    kw = dict(num_inference_steps=6, guidance_scale=1.0, seed=0, num_images_per_prompt=4, output_type="latent",
              progress=False, sampler="ddpm")
    plain = ours("", **kw).images
    zero = ours("", classifier=classifier, classifier_scale=0.0, label="blue", **kw).images
    assert torch.equal(plain, zero)
    guided = ours("", classifier=classifier, classifier_scale=20.0, label=2, **kw).images
    assert label_log_prob(classifier, guided, 2) > label_log_prob(classifier, plain, 2) + 0.05
    out = ours(["a red circle", "a blue square"], sampler="euler", classifier=classifier, classifier_scale=5.0,
               label=["red", "blue"], num_inference_steps=2, seed=1, output_type="np", progress=False).images
    assert out.shape == (2, 32, 32, 3)


def test_classifier_options_errors_name_the_problem(ours, tmp_path) -> None:
    classifier = tiny_classifier()
    kw = dict(num_inference_steps=2, seed=0, output_type="latent", progress=False)
    with pytest.raises(OptionError, match=r"label must be a class of the classifier: 0\.\.2 or \['red', 'green', "):
        ours("", classifier=classifier, label=3, **kw)
    with pytest.raises(OptionError, match="label must be a class"):
        ours("", classifier=classifier, label="purple", **kw)
    with pytest.raises(OptionError, match=r"one label, or one per image \(1\)"):
        ours("", classifier=classifier, label=[0, 1], **kw)
    with pytest.raises(OptionError, match="label must be given with a classifier"):
        ours("", label=0, **kw)
    with pytest.raises(OptionError, match="label must be the class to guide toward"):
        ours("", classifier=classifier, **kw)
    with pytest.raises(OptionError, match="takes 3-channel latents .* wrong input shape"):
        ours("", classifier=tiny_classifier(3), label=0, **kw)
    with pytest.raises(OptionError, match="classifier_scale must be a number >= 0"):
        ours("", classifier=classifier, classifier_scale=-1.0, label=0, **kw)
    classifier.save_pretrained(tmp_path / "clf")
    ours("", classifier=tmp_path / "clf", label="green", **kw)  # a folder loads


def test_log_prob_reads_the_unets_vp_input_and_timestep(ours) -> None:
    """ClassifierLogProb feeds the classifier x / sqrt(1 + sigma^2) at the denoiser's t(sigma): at a table sigma it
    is the classifier on the VP latent at that integer timestep (exact)."""
    from ldm.diffusion.samplers import SAMPLERS

    plan = SAMPLERS["euler"].plan(ours.schedule, 4)
    base = plan.denoiser(lambda x, t, **c: x)
    classifier, table = tiny_classifier(), ours.schedule.sigmas()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = table[[100, 700]].float()
    got = ClassifierLogProb(classifier, base, torch.tensor([0, 2]))(x, sigma)
    x_vp = x / (1 + sigma**2).sqrt()[:, None, None, None]
    want = classifier(x_vp, torch.tensor([100.0, 700.0])).log_softmax(1)[[0, 1], [0, 2]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_bundled_classifier_fits_the_bundled_model_and_moves_images_toward_its_label() -> None:
    """classifier="default" loads the shipped colour classifier, which matches the bundled model's latents and
    schedule; one DDPM step's guided x0 differs from the unguided one and scale 0 equals it exactly."""
    from ldm.loading.sources import DEFAULT_MODEL
    from pipelines.guidance_options import check_classifier_options, load_classifier

    clf = load_classifier("default")
    assert clf.config.labels[0] == "red" and (DEFAULT_MODEL / "classifier" / "model.safetensors").is_file()
    model, labels = check_classifier_options("default", 2.0, ["red", "blue"], 2, 4, 1000)
    assert labels.tolist() == [0, 5] and model.config.in_channels == 4
    from pipelines import Pipeline

    pipe = Pipeline(device="cpu", dtype=torch.float32)
    kw = dict(guidance_scale=1.0, sampler="ddpm", num_inference_steps=2, seed=0, output_type="latent", progress=False)
    plain = pipe("", **kw).images
    assert torch.equal(pipe("", classifier="default", label="red", classifier_scale=0.0, **kw).images, plain)
    assert not torch.allclose(pipe("", classifier="default", label="red", classifier_scale=8.0, **kw).images, plain)
