"""`ldm generate --lora PATH[:SCALE]`: the image of the Pipeline with that LoRA at that scale; bad options and files
are one-line errors (exit 2)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.lora.weights import LoraModule, save_lora_file
from pipelines.cli import main
from tests.lora._lora import ours, random_lora

ARGS = ["--steps", "2", "--no-progress", "--device", "cpu", "--dtype", "float32", "--seed", "3", "--height", "32",
        "--width", "32", "--sampler", "euler"]


@pytest.fixture(scope="module")
def lora_file(sd1_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_lora") / "style.safetensors"
    save_lora_file(path, random_lora(ours(sd1_folder)), format="kohya")
    return path


def test_generate_with_a_lora_at_a_scale_gives_the_pipelines_image(sd1_folder, lora_file, tmp_path):
    out, plain = tmp_path / "lora.png", tmp_path / "plain.png"
    assert main(["generate", "a red circle", "-o", str(out), "--model", str(sd1_folder), *ARGS,
                 "--lora", f"{lora_file}:0.5"]) == 0
    assert main(["generate", "a red circle", "-o", str(plain), "--model", str(sd1_folder), *ARGS]) == 0
    pipe = ours(sd1_folder)
    pipe.load_lora(lora_file, scale=0.5)
    want = pipe("a red circle", num_inference_steps=2, sampler="euler", seed=3, height=32, width=32,
                progress=False).images[0]
    with Image.open(out) as got, Image.open(plain) as base:
        got, base = np.asarray(got, dtype=np.int16), np.asarray(base, dtype=np.int16)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1
    assert np.abs(got - base).max() > 10  # the LoRA shows


@pytest.mark.parametrize("spec, needle", [
    ("{tmp}/missing.safetensors", "--lora {tmp}/missing.safetensors: no file {tmp}/missing.safetensors"),
    ("{lora}:inf", "the scale must be a finite number"),
    ("{bad}", "matches no module of the unet"),
])  # fmt: skip
def test_bad_lora_options_are_one_line_errors(sd1_folder, lora_file, tmp_path, capsys, spec, needle):
    bad = tmp_path / "bad.safetensors"
    save_lora_file(bad, {"unet.nowhere.to_q": LoraModule(torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}, format="kohya")
    fill = {"tmp": tmp_path, "lora": lora_file, "bad": bad}
    assert main(["generate", "x", "-o", str(tmp_path / "o.png"), "--model", str(sd1_folder), *ARGS,
                 "--lora", spec.format(**fill)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle.format(**fill) in lines[0], lines
    assert not (tmp_path / "o.png").exists()
