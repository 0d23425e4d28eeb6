"""Training a noisy classifier (ldm.training.classifier) on single-object shapes images through the tiny model's VAE
and schedule: a few steps run and save a classifier the pipeline loads; labels come from the metadata key path; the
bundled YAML loads; bad data is an error naming it."""

import json

import pytest
import torch

from ldm.config import ConfigError, config_path
from ldm.networks.classifier import NoisyClassifier
from ldm.shapes.dataset import export_imagefolder
from ldm.training.classifier import (
    ClassifierTrainConfig,
    labelled_images,
    main,
    metadata_value,
    train_classifier,
)
from ldm.training.config import load_train_config
from tests._helpers import save_tiny_folder


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return export_imagefolder(tmp_path_factory.mktemp("data") / "single", 24, "train", 0, size=32,
                              layouts={"single": 1.0})


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def overrides(single, tiny_folder, out, *extra):
    return [f"data={single}", f"pipeline={tiny_folder}", "resolution=32", "steps=3", "batch_size=4", "log_every=1",
            f"output_dir={out}", "model.block_out_channels=[8,16]", "model.time_embed_dim=16",
            "model.norm_num_groups=4", *extra]


def test_a_few_steps_train_and_save_a_classifier_for_the_model(single, tiny_folder, tmp_path):
    config = load_train_config(ClassifierTrainConfig, config_path("train-classifier-shapes.yaml"),
                               overrides(single, tiny_folder, tmp_path / "clf"))
    result = train_classifier(config)
    records = [json.loads(line) for line in (single / "metadata.jsonl").read_text().splitlines()]
    colours = [r["prompt"]["objects"][0]["color"] for r in records]
    assert result["records"] == 24 - result["skipped"] == sum(c in config.model.labels for c in colours)
    clf = NoisyClassifier.from_pretrained(tmp_path / "clf")
    c = clf.config  # the model's latent channels and size, and its schedule's timesteps
    assert (c.in_channels, c.sample_size, c.num_train_timesteps, c.labels) == (4, 4, 1000, config.model.labels)
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    assert json.loads((tmp_path / "clf/training.json").read_text())["records"] == result["records"]
    assert main(["--config", "train-classifier-shapes.yaml", *overrides(single, tiny_folder, tmp_path / "cli")]) == 0
    again = NoisyClassifier.from_pretrained(tmp_path / "cli")
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(), again.state_dict().values(), strict=True))


def test_labels_come_from_the_metadata_key_path(single, tiny_folder, tmp_path):
    record = {"prompt": {"objects": [{"shape": "star", "color": "red"}]}}
    assert metadata_value(record, "prompt.objects.0.shape") == "star"
    assert metadata_value(record, "prompt.objects.1.shape") is None
    config = load_train_config(ClassifierTrainConfig, config_path("train-classifier-shapes.yaml"), overrides(
        single, tiny_folder, tmp_path, "model.attribute=prompt.objects.0.shape",
        "model.labels=[circle,square,triangle,star,cross,diamond]"))
    images, labels, skipped = labelled_images(single, config)
    shapes = [json.loads(line)["prompt"]["objects"][0]["shape"] for line in (single / "metadata.jsonl").open()]
    assert skipped == 0 and labels.tolist() == [config.model.labels.index(s) for s in shapes]
    assert images.shape == (24, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    config = load_train_config(ClassifierTrainConfig, config_path("train-classifier-shapes.yaml"), overrides(
        single, tiny_folder, tmp_path, "model.labels=[black,brown]"))
    with pytest.raises(ConfigError, match=r"no record has a value of 'prompt.objects.0.color' among .*black"):
        labelled_images(single, config)
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        labelled_images(tmp_path, config)
