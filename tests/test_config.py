from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ldm.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Outer:
    name: str
    steps: int = 10
    kind: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    seed: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(name="x", steps=3, kind="b", sizes=(4, 5, 6), seed=7, inner=Inner(lr=0.5, betas=(0.1, 0.2)))
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Outer, tmp_path / "c.yaml") == cfg
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_int_is_accepted_for_float_and_converted():
    assert from_dict(Outer, {"name": "x", "inner": {"lr": 1}}).inner.lr == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "stepz": 1}, "unknown key(s) ['stepz']"),
        ({"name": "x", "steps": "ten"}, "Outer.steps: expected an integer"),
        ({"name": "x", "steps": True}, "Outer.steps: expected an integer"),
        ({"name": "x", "kind": "c"}, "Outer.kind: 'c' is not one of ['a', 'b']"),
        ({"name": "x", "inner": {"lr": "fast"}}, "Outer.inner.lr: expected a number"),
        ({"name": "x", "inner": {"momentum": 1}}, "Outer.inner: unknown key(s) ['momentum']"),
        ({"name": "x", "sizes": [1, "b"]}, "Outer.sizes[1]: expected an integer"),
        ({"steps": 1}, "missing required key(s) ['name']"),
    ],
)
def test_bad_keys_and_values_are_named(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_overrides_parse_yaml_scalars_and_nest():
    out = apply_overrides({"name": "x", "inner": {"lr": 1.0}}, ["inner.lr=3e-4", "steps=5", "seed=null"])
    assert from_dict(Outer, out) == Outer(name="x", steps=5, seed=None, inner=Inner(lr=3e-4))
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["steps"])


def test_yaml_reads_exponent_floats_without_a_dot(tmp_path):
    (tmp_path / "c.yaml").write_text("name: x\ninner:\n  lr: 1e-4\n  betas: [9e-1, 0.999]\n")
    assert load_config(Outer, tmp_path / "c.yaml").inner == Inner(lr=1e-4, betas=(0.9, 0.999))


def test_config_path_finds_a_file_first_then_a_bundled_config_by_bare_name(tmp_path, monkeypatch):
    from ldm.config import BUNDLED_CONFIGS, config_path

    monkeypatch.chdir(tmp_path)
    assert config_path("train-tiny.yaml") == BUNDLED_CONFIGS / "train-tiny.yaml"
    assert config_path("train-tiny") == BUNDLED_CONFIGS / "train-tiny.yaml"
    (tmp_path / "train-tiny.yaml").write_text("model: {}\n")  # a file of the same name where it is given wins
    assert config_path("train-tiny.yaml") == Path("train-tiny.yaml")
    with pytest.raises(FileNotFoundError, match=r"config file not found: sub/train-tiny.yaml \(a bare name finds a "
                                                r"bundled config: default-model.yaml, .*vae-train-tiny.yaml(, [\w.-]+)*\)"):
        config_path("sub/train-tiny.yaml")  # a path with a folder is never looked up among the bundled ones
