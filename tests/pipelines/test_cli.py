"""The `ldm` command line, called in-process on a tiny seeded model folder (plus one console-script smoke test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.cli import main, output_paths
from ldm.loading.components import save_pipeline
from ldm.loading.sources import load_components
from pipelines.tiny import tiny_components

FAST = ["--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    c = tiny_components(seed=0)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    save_pipeline(path, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    return path


def generate(model: Path, out: Path, *extra: str) -> int:
    return main(["generate", "a red circle above a blue square", "-o", str(out), "--model", str(model), *FAST, *extra])


def test_generate_writes_png_of_the_requested_size_and_is_reproducible(model, tmp_path, capsys):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert generate(model, a, "--seed", "7", "--height", "48", "--width", "32") == 0
    assert "seed 7" in capsys.readouterr().out
    with Image.open(a) as im:
        assert im.format == "PNG" and im.size == (32, 48) and im.mode == "RGB"  # PIL size is (width, height)
    assert generate(model, b, "--seed", "7", "--height", "48", "--width", "32") == 0
    assert a.read_bytes() == b.read_bytes()  # same seed, same device: identical bytes
    assert generate(model, c, "--seed", "8", "--height", "48", "--width", "32") == 0
    assert a.read_bytes() != c.read_bytes()  # so the equality above could fail
    assert generate(model, c, "--seed", "7", "--height", "48", "--width", "32", "--guidance-interval", "0", "1e9") == 0
    assert a.read_bytes() == c.read_bytes()  # an interval holding every step is plain guidance
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]  # no temporary files left


def test_generate_several_images_files_and_grid(model, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert generate(model, out, "--seed", "3", "-n", "3") == 0
    printed = capsys.readouterr().out
    paths = output_paths(out, 3)
    assert [p.name for p in paths] == ["img.png", "img-1.png", "img-2.png"]
    for i, p in enumerate(paths):
        assert f"{p} (seed {3 + i})" in printed  # image i has seed + i
        with Image.open(p) as im:
            assert im.size == (32, 32)  # the tiny model's native size: sample_size 4 x VAE factor 8
    single = tmp_path / "single.png"
    assert generate(model, single, "--seed", "4") == 0  # the second image of the batch, alone
    # the same noise; CPU kernels round differently with the batch size, so compare pixels within 1 level
    got = torch.tensor(list(Image.open(paths[1]).getdata()), dtype=torch.int16)
    ref = torch.tensor(list(Image.open(single).getdata()), dtype=torch.int16)
    assert (got - ref).abs().max() <= 1

    grid = tmp_path / "grid.png"
    assert generate(model, grid, "--seed", "3", "-n", "3", "--grid", "--grid-cols", "2") == 0
    with Image.open(grid) as im:
        assert im.size == (64, 64)  # 2 columns x 2 rows of 32 x 32
        tile = im.crop((32, 0, 64, 32))
    assert torch.equal(torch.tensor(list(tile.getdata())), torch.tensor(list(Image.open(paths[1]).getdata())))
    assert not (tmp_path / "grid-1.png").exists()


def test_img2img_takes_the_init_image_size(model, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (40, 24), (200, 30, 30)).save(init)
    out = tmp_path / "out.png"
    assert generate(model, out, "--seed", "0", "--image", str(init), "--strength", "0.5", "--guidance", "1") == 0
    with Image.open(out) as im:
        assert im.size == (40, 24)


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_convert_folder_file_folder_round_trip_is_bit_exact(model, tmp_path, capsys):
    single, back = tmp_path / "model.safetensors", tmp_path / "back"
    assert main(["convert", str(model), str(single)]) == 0
    assert main(["convert", str(single), str(back)]) == 0
    assert "single file" in capsys.readouterr().out
    ref, got = _tensors(model), _tensors(back)
    assert ref.keys() == got.keys() and len(ref) == 3  # unet, vae, text_encoder
    for name in ref:
        assert ref[name].keys() == got[name].keys(), name
        for k in ref[name]:
            assert ref[name][k].dtype == got[name][k].dtype and torch.equal(ref[name][k], got[name][k]), f"{name} {k}"
    for cfg in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert json.loads((model / cfg).read_text()) == json.loads((back / cfg).read_text()), cfg
    a, b = load_components(model), load_components(back)
    assert a.schedule == b.schedule and a.text_encoder.tokenizer.pad_token == b.text_encoder.tokenizer.pad_token
    assert a.text_encoder.model.config.to_dict() == b.text_encoder.model.config.to_dict()
    # an existing destination is kept unless --overwrite
    assert main(["convert", str(single), str(back)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(single), str(back), "--overwrite"]) == 0


def test_convert_prediction_type_and_info(model, tmp_path, capsys):
    v = tmp_path / "v"
    assert main(["convert", str(model), str(v), "--prediction-type", "v_prediction"]) == 0
    capsys.readouterr()
    assert main(["info", str(v), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    c = load_components(model)
    assert info["schedule"]["prediction_type"] == "v_prediction"
    assert {k: w for k, w in info["schedule"].items() if k != "prediction_type"} == {
        k: w for k, w in c.schedule.to_diffusers().items() if k != "prediction_type"}
    assert info["unet"]["config"] == json.loads(json.dumps(c.unet.config.to_diffusers()))
    assert info["vae"]["config"] == json.loads(json.dumps(c.vae.config.to_diffusers()))
    counts = {k: sum(p.numel() for p in m.parameters())
              for k, m in (("unet", c.unet), ("vae", c.vae), ("text_encoder", c.text_encoder.model))}  # fmt: skip
    for k, n in counts.items():
        assert info[k]["parameters"] == n, k
    assert info["total_parameters"] == sum(counts.values())
    assert info["text_encoder"]["config"]["hidden_size"] == 32

    assert main(["info", str(model)]) == 0
    text = capsys.readouterr().out
    assert f"total parameters: {sum(counts.values()):,}" in text
    assert f"[unet] UNet, {counts['unet']:,} parameters" in text
    for line in ("cross_attention_dim: 32", "block_out_channels: [32, 64]", "latent_channels: 4",
                 "prediction_type: epsilon", "beta_schedule: scaled_linear", "num_hidden_layers: 2"):  # fmt: skip
        assert line in text, line


def _pickle_file(tmp: Path) -> Path:
    path = tmp / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    return path


@pytest.mark.parametrize(
    "args, needle",
    [
        (["generate", "", "--model", "{model}"], "prompt is empty"),
        (["generate", "   ", "--model", "{model}"], "prompt is empty"),
        (["generate", "x", "--model", "{model}", "--sampler", "nope"], "--sampler: unknown sampler 'nope'; valid: ['ddim', "),
        (["generate", "x", "--model", "{model}", "--height", "30"], "--height must be a positive multiple of 8 (the VAE factor), e.g. 24 or 32, got 30"),
        (["generate", "x", "--model", "{model}", "--width", "-8"], "--width must be an integer >= 1, got -8"),
        (["generate", "x", "--model", "{model}", "--steps", "0"], "--steps must be an integer in [1, 1000], got 0"),
        (["generate", "x", "--model", "{tmp}/nowhere"], "no model folder or checkpoint file"),
        (["generate", "x", "--model", "{ckpt}"], "pickle file"),
        (["generate", "x", "--model", "{model}", "--strength", "0.5"], "--strength needs --image"),
        (["generate", "x", "--model", "{model}", "--image", "{tmp}/missing.png"], "cannot read --image"),
        (["generate", "x", "--model", "{model}", "--device", "cuda:7"], "--device must be a device of this machine (cpu, cuda, cuda:1, mps), got 'cuda:7': torch sees no CUDA"),
        (["generate", "x", "--model", "{model}", "--steps", "two"], "invalid int value"),
        (["convert", "{ckpt}", "{tmp}/out"], "pickle file"),
        (["convert", "{model}", "{tmp}/out.ckpt"], ".safetensors only"),
        (["info", "{tmp}/nowhere"], "no model folder or checkpoint file"),
        (["export", "{tmp}/nowhere", "{tmp}/out"], "neither a checkpoint folder"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_exit_2_one_line_no_output(model, tmp_path, capsys, args, needle):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    ckpt = _pickle_file(tmp_path)
    args = [a.format(model=model, tmp=tmp_path, ckpt=ckpt) for a in args]
    before = set(tmp_path.iterdir())
    out = tmp_path / "out.png"
    if args[0] == "generate":
        args = [args[0], *FAST, "-o", str(out), *args[1:]]  # the case's own options come last and win
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # no output file, no temporary file


def test_a_failing_write_leaves_no_partial_file(model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.png"
    real_save = Image.Image.save

    def broken(self, fp, *a, **k):
        real_save(self, fp, *a, **k)  # the temporary file is complete on disk ...
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(Image.Image, "save", broken)
    assert generate(model, out, "--seed", "0") == 1  # the machine failed, not the input: exit 1, one line
    assert capsys.readouterr().err == "ldm: error: disk full\n"
    assert list(tmp_path.iterdir()) == []


def test_train_and_export_forward(model, tmp_path, capsys):
    assert main(["train", "--help"]) == 0
    assert "ldm train" in capsys.readouterr().out  # ldm.training.unet's own parser answered
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_console_script_help():
    exe = Path(sys.executable).with_name("ldm")
    if not exe.exists():
        pytest.skip(f"the console script is not installed beside {sys.executable} (pip install -e .)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([str(exe), "--help"], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    for command in ("generate", "convert", "info", "train", "export"):
        assert command in run.stdout
    bad = subprocess.run([str(exe), "generate"], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "prompt" in bad.stderr



def test_generate_threads_option(tmp_path, monkeypatch):
    """--threads sets torch's thread count for the run; 0 is refused by name before anything loads."""
    import torch

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--threads", "0"]) == 2
    assert calls == []
    assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--threads", "1", "--steps", "2",
                 "--no-progress"]) == 0
    assert calls == [1] and (tmp_path / "x.png").is_file()
