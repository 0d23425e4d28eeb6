"""Training a noise-aware CLIP (ldm.training.noisy_clip) through the tiny model's VAE, schedule and text encoder: the
contrastive loss masks identical captions out of the softmax (closed form), a few steps save a CLIP the pipeline
uses, with the model's latent channels, size, timesteps and pooled width, and training.json records the command and
retrieval accuracy; bad data is an error naming it."""

import json
import math

import pytest
import torch

from ldm.config import ConfigError, config_path
from ldm.networks.noisy_clip import NoisyCLIP
from ldm.shapes.dataset import export_imagefolder
from ldm.training.config import load_train_config
from ldm.training.noisy_clip import (
    NoisyCLIPTrainConfig,
    clip_loss,
    main,
    retrieval_accuracy,
    train_noisy_clip,
)
from pipelines.text_to_image import Pipeline
from tests._helpers import save_tiny_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return export_imagefolder(tmp_path_factory.mktemp("data") / "shapes", 16, "train", 0, size=32,
                              layouts={"single": 0.5, "relation": 0.5})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def overrides(data, folder, out, *extra):
    return [f"data={data}", f"pipeline={folder}", "resolution=32", "steps=3", "batch_size=8", "log_every=1",
            f"output_dir={out}", "model.block_out_channels=[8,16]", "model.time_embed_dim=16",
            "model.norm_num_groups=4", "model.embed_dim=8", "eval_timesteps=[0,999]", *extra]


def test_identical_captions_are_not_negatives() -> None:
    """clip_loss = mean over both directions of -log softmax over the columns whose caption differs from the row's
    (and the row's own), computed by hand (1e-6); with all captions distinct it is plain CLIP InfoNCE."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=-1)
    scale, ids = torch.tensor(math.log(10.0)), torch.tensor([0, 1, 0, 2])
    logits = 10.0 * image @ text.T

    def by_hand(m: torch.Tensor) -> torch.Tensor:
        terms = []
        for i in range(4):
            keep = [j for j in range(4) if j == i or ids[j] != ids[i]]
            terms.append(torch.logsumexp(m[i, keep], 0) - m[i, i])
        return torch.stack(terms).mean()

    torch.testing.assert_close(clip_loss(image, text, scale, ids), (by_hand(logits) + by_hand(logits.T)) / 2,
                               rtol=0, atol=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    plain_t = torch.nn.functional.cross_entropy(logits.T, torch.arange(4))
    torch.testing.assert_close(clip_loss(image, text, scale, torch.arange(4)), (plain + plain_t) / 2, rtol=0,
                               atol=1e-6)
    accuracy, chance = retrieval_accuracy(image, image, ids)  # each image's own embedding is the best match
    assert accuracy == 1.0 and chance == pytest.approx(6 / 16)


def test_a_few_steps_train_and_save_a_clip_the_pipeline_uses(shapes, tiny_folder, tmp_path) -> None:
    config = load_train_config(NoisyCLIPTrainConfig, config_path("train-noisy-clip-shapes.yaml"),
                               overrides(shapes, tiny_folder, tmp_path / "clip"))
    result = train_noisy_clip(config, command="the command")
    clip = NoisyCLIP.from_pretrained(tmp_path / "clip")
    c = clip.config  # the model's latent channels and size, its schedule's timesteps, its text encoder's width
    assert (c.in_channels, c.sample_size, c.num_train_timesteps, c.text_dim, c.embed_dim) == (4, 4, 1000, 32, 8)
    assert result["records"] == 16 and result["skipped"] == 0 and math.isfinite(result["loss"])
    saved = json.loads((tmp_path / "clip/training.json").read_text())
    assert saved["command"] == "the command" and set(saved["eval"]["retrieval_accuracy"]) == {"0", "999"}
    assert 0 < saved["eval"]["chance"] <= 1 and saved["eval"]["items"] == 8
    pipe = Pipeline.from_pretrained(tiny_folder, device="cpu", dtype=torch.float32)
    out = pipe("a red circle", noisy_clip=tmp_path / "clip", clip_guidance_scale=5.0, num_inference_steps=2, seed=0,
               output_type="latent", progress=False).images
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all()
    assert main(["--config", "train-noisy-clip-shapes.yaml", *overrides(shapes, tiny_folder, tmp_path / "cli")]) == 0
    again = NoisyCLIP.from_pretrained(tmp_path / "cli")  # the same seed: the same weights
    assert all(torch.equal(a, b) for a, b in zip(clip.state_dict().values(), again.state_dict().values(), strict=True))
    assert json.loads((tmp_path / "cli/training.json").read_text())["command"].startswith(
        "python -m ldm.training.noisy_clip --config train-noisy-clip-shapes.yaml data=")


def test_bad_data_is_named(tiny_folder, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    config = load_train_config(NoisyCLIPTrainConfig, config_path("train-noisy-clip-shapes.yaml"),
                               overrides(tmp_path / "empty", tiny_folder, tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="metadata.jsonl not found: the noise-aware CLIP trains on"):
        train_noisy_clip(config)
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ConfigError, match=r"0 record\(s\) with a \"text\" caption"):
        train_noisy_clip(config)
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        NoisyCLIPTrainConfig(batch_size=1)
