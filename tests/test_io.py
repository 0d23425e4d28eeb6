import os
from pathlib import Path

import pytest
import torch

from ldm.io import (
    WeightsError,
    atomic_directory,
    load_state_dict,
    load_weights,
    read_json,
    save_state_dict,
    write_json,
)


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    sd = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5), "c": torch.randn(2).half()}
    save_state_dict(sd, tmp_path / "w.safetensors")
    back = load_state_dict(tmp_path / "w.safetensors")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_needs_explicit_permission(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save({"state_dict": {"a": torch.ones(2)}}, path)
    with pytest.raises(WeightsError, match="pickle file.*allow_pickle=True"):
        load_state_dict(path)
    assert torch.equal(load_state_dict(path, allow_pickle=True)["a"], torch.ones(2))


def test_missing_corrupt_and_unknown_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_state_dict(bad)
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unknown weight format"):
        load_state_dict(odd)


def test_truncated_safetensors_is_an_error(tmp_path):
    save_state_dict({"a": torch.randn(100)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        load_state_dict(tmp_path / "w.safetensors")


def test_load_weights_names_missing_unexpected_and_misshaped_keys():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["1.weight"] = torch.zeros(2, 5)
    sd["extra"] = torch.zeros(1)
    del sd["0.bias"]
    with pytest.raises(WeightsError) as e:
        load_weights(model, sd, what="unet")
    msg = str(e.value)
    assert "unet" in msg and "missing key(s) [0.bias]" in msg and "unexpected key(s) [extra]" in msg
    assert "1.weight: model (2, 4) vs file (2, 5)" in msg


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as d:
        write_json({"v": 1}, d / "a.json")
    assert read_json(target / "a.json") == {"v": 1}
    ours = lambda p: (p / "a.json").is_file()  # noqa: E731 - the caller's test that the folder is of its kind
    with pytest.raises(RuntimeError):
        with atomic_directory(target, may_replace=ours) as d:
            write_json({"v": 2}, d / "a.json")
            raise RuntimeError("crash while writing")
    assert read_json(target / "a.json") == {"v": 1}  # the old folder is intact
    assert sorted(os.listdir(tmp_path)) == ["model"]  # and nothing half-written is left
    with atomic_directory(target, may_replace=ours) as d:
        write_json({"v": 3}, d / "b.json")
    assert sorted(os.listdir(target)) == ["b.json"]
    with pytest.raises(FileExistsError, match=r"model already holds files this did not write \(b.json\)"):
        with atomic_directory(target, may_replace=ours) as d:  # b.json alone is not of the caller's kind
            write_json({"v": 4}, d / "a.json")
    assert sorted(os.listdir(target)) == ["b.json"] and sorted(os.listdir(tmp_path)) == ["model"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        with atomic_directory(tmp_path / "file", may_replace=lambda p: True):
            pass


def test_replacing_a_folder_never_leaves_it_missing(tmp_path, monkeypatch):
    from ldm.io import exchange_paths

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("a")
    b.mkdir()
    (b / "y").write_text("b")
    if not exchange_paths(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert (a / "y").read_text() == "b" and (b / "x").read_text() == "a"  # swapped whole
    with pytest.raises(FileNotFoundError):
        exchange_paths(a, tmp_path / "missing")

    # with the swap, atomic_directory never renames the live folder away (os.replace would leave a gap)
    target = tmp_path / "model"
    with atomic_directory(target) as d:
        write_json({"v": 1}, d / "a.json")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src) == target or Path(dst) == target:
            pytest.fail(f"os.replace({src}, {dst}) moved the live folder")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_directory(target, may_replace=lambda p: True) as d:
        write_json({"v": 2}, d / "a.json")
    monkeypatch.undo()
    assert read_json(target / "a.json") == {"v": 2} and sorted(os.listdir(tmp_path)) == ["a", "b", "model"]


def test_model_folder_round_trip_and_pickle_fallback(tmp_path):
    from ldm.io import DIFFUSERS_WEIGHTS, load_model_folder, save_model_folder

    sd = {"w": torch.randn(2, 3)}
    save_model_folder(tmp_path / "unet", {"a": 1}, sd, DIFFUSERS_WEIGHTS[0])
    config, back = load_model_folder(tmp_path / "unet", DIFFUSERS_WEIGHTS)
    assert config == {"a": 1} and torch.equal(back["w"], sd["w"])
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    write_json({"a": 2}, legacy / "config.json")
    torch.save(sd, legacy / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="no safetensors file is present"):
        load_model_folder(legacy, DIFFUSERS_WEIGHTS)
    assert torch.equal(load_model_folder(legacy, DIFFUSERS_WEIGHTS, allow_pickle=True)[1]["w"], sd["w"])
    with pytest.raises(FileNotFoundError, match="no weight file"):
        load_model_folder(tmp_path, DIFFUSERS_WEIGHTS)


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import stat

    from ldm.io import write_bytes

    mask = os.umask(0o022)
    try:
        write_bytes(b"x", tmp_path / "f.bin")
        with atomic_directory(tmp_path / "d") as d:
            write_json({}, d / "a.json")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644  # mkstemp alone would give 0600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # mkdtemp alone would give 0700


def test_weights_and_configs_are_written_with_one_mode(tmp_path):
    """safetensors, JSON and text files all get a new file's mode (0666 less the umask), not mkstemp's 0600."""
    import os
    import stat

    from ldm.io import save_state_dict, write_json

    save_state_dict({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    write_json({"a": 1}, tmp_path / "c.json")
    mask = os.umask(0)
    os.umask(mask)
    modes = {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("w.safetensors", "c.json")}
    assert modes == {0o666 & ~mask}


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_writer(tmp_path):
    """atomic_directory names its temporary folder with the writer's pid; the next write of the same folder removes
    one whose writer is gone (a killed export of gigabytes), and leaves a live writer's alone."""
    import os
    import subprocess
    import sys

    from ldm.io import atomic_directory

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.{dead.pid}.abcd_123.tmp"
    live = tmp_path / f".model.{os.getppid()}.zz99yy88.tmp"
    other = tmp_path / f".other.{dead.pid}.abcd_123.tmp"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "unet.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match=rf"removed 1 temporary folder\(s\) a killed writer left .*{stale.name}"):
        with atomic_directory(tmp_path / "model") as tmp:
            assert tmp.name.startswith(f".model.{os.getpid()}.")
            (tmp / "x").write_text("new")
    assert not stale.exists() and live.exists() and other.exists()
    assert (tmp_path / "model" / "x").read_text() == "new"


def test_integer_or_boolean_weights_are_refused_naming_the_key():
    from ldm.io import WeightsError, check_state_dict

    expected = {"a.weight": torch.zeros(2, 2), "a.bias": torch.zeros(2), "steps": torch.zeros(1, dtype=torch.long)}
    given = {"a.weight": torch.zeros(2, 2, dtype=torch.int32), "a.bias": torch.zeros(2, dtype=torch.bool),
             "steps": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"wrong kind .*a\.weight: int32 where the model holds float32.*"
                                           r"a\.bias: bool .*steps: float32 where the model holds int64"):
        check_state_dict(expected, given, what="model")
    check_state_dict(expected, {**given, "a.weight": torch.zeros(2, 2, dtype=torch.float16),
                                "a.bias": torch.zeros(2), "steps": torch.zeros(1, dtype=torch.int32)}, what="model")
