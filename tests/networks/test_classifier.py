"""The noisy classifier: shapes, a bit-exact save / load round trip, labels by index or name, errors naming the
problem."""

import json

import pytest
import torch

from ldm.config import ConfigError
from ldm.io import load_state_dict, save_state_dict
from ldm.networks.classifier import ClassifierConfig, NoisyClassifier
from ldm.random import seeded


def tiny() -> NoisyClassifier:
    with seeded(0):
        return NoisyClassifier(ClassifierConfig(labels=("red", "green", "blue"), block_out_channels=(8, 16),
                                                time_embed_dim=16, norm_num_groups=4)).eval()


def test_logits_depend_on_x_and_t_and_any_latent_size_works() -> None:
    model = tiny()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = model(x, torch.tensor([10.0, 10.0]))
    assert a.shape == (2, 3)
    assert not torch.equal(a, model(x, torch.tensor([900.0, 900.0])))  # the timestep reaches the logits
    assert not torch.equal(a[0], a[1])
    assert model(torch.randn(1, 4, 12, 12), torch.tensor([5.0])).shape == (1, 3)  # global pooling
    torch.testing.assert_close(model(x, torch.tensor(10.0)), a, rtol=0, atol=0)  # a scalar t is broadcast


def test_save_and_load_round_trip_is_bit_exact(tmp_path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path / "clf")
    loaded = NoisyClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 400.0, 999.0])
    assert torch.equal(model(x, t), loaded(x, t))


def test_errors_name_the_problem(tmp_path) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=r"takes \(B, 4, H, W\) latents .*got shape \(1, 3, 8, 8\)"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    assert model.label_index("blue") == 2 and model.label_index(1) == 1
    for bad in (3, -1, "purple", True):
        with pytest.raises(ValueError, match=r"valid: 0\.\.2 or \['red', 'green', 'blue'\]"):
            model.label_index(bad)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        ClassifierConfig(labels=("red", "red"))
    model.save_pretrained(tmp_path / "clf")
    state = load_state_dict(tmp_path / "clf/model.safetensors")
    state["extra.weight"] = torch.zeros(1)
    save_state_dict(state, tmp_path / "clf/model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        NoisyClassifier.from_pretrained(tmp_path / "clf")
    config = json.loads((tmp_path / "clf/config.json").read_text())
    (tmp_path / "clf/config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ConfigError, match="num_layers"):
        NoisyClassifier.from_pretrained(tmp_path / "clf")
