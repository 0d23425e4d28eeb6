"""Call options are checked before any model loads or network runs, in one place for the API and the CLI
(pipelines.call_options); sizes and counts are bounded by a memory estimate (pipelines.memory); `ldm generate -n N`
writes its images batch by batch; every `ldm` error is one line (exit 2), a traceback only with --debug or for a bug.

Loading and network evaluation are spied on, not timed: the loader and the networks fail the test if they run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from autoencoder.model import AutoencoderKL
from ldm.networks.text import TextEncoder
from ldm.networks.unet import UNet
from pipelines import memory
from pipelines.call_options import OptionError, check_call_options
from pipelines.cli import main
from pipelines.memory import MemoryEstimateError
from pipelines.text_to_image import Pipeline

GIB = 2**30
FAST = ["--steps", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture
def no_network(monkeypatch):
    """Record every network evaluation (U-Net, VAE encoder and decoder, text encoder) instead of running it."""
    calls: list[str] = []

    def spy(name):
        def refuse(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the {name} was evaluated")
        return refuse

    for cls, method in ((UNet, "forward"), (AutoencoderKL, "decode"), (AutoencoderKL, "encode"),
                        (TextEncoder, "encode")):
        monkeypatch.setattr(cls, method, spy(f"{cls.__name__}.{method}"))
    return calls


@pytest.fixture
def no_loading(monkeypatch):
    """Record every attempt to load a model (a folder, hub name or single file)."""
    from ldm.loading import single_file, sources

    calls: list[str] = []
    monkeypatch.setattr(sources, "load_components", lambda *a, **k: calls.append("load_components") or 1 / 0)
    monkeypatch.setattr(single_file, "load_single_file", lambda *a, **k: calls.append("load_single_file") or 1 / 0)
    return calls


@pytest.fixture
def one_gib(monkeypatch):
    """The machine has 1 GiB available, whatever it really has: memory refusals that do not depend on it."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: (GIB, "available (test)"))


def _image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 30, 30))


# ---------------------------------------------------------------------------------------------------------- the API

NAN, INF = float("nan"), float("inf")
API_CASES = [  # (keyword arguments, error type, what the message must say: the option and the value)
    ({"guidance_scale": NAN}, OptionError, ["guidance_scale", "nan", "[0, 100]"]),
    ({"guidance_scale": INF}, OptionError, ["guidance_scale", "inf"]),
    ({"guidance_scale": -1.0}, OptionError, ["guidance_scale", "-1.0"]),
    ({"guidance_scale": 101}, OptionError, ["guidance_scale", "101"]),
    ({"guidance_scale": "7"}, OptionError, ["guidance_scale", "'7'"]),
    ({"guidance_rescale": 1.5}, OptionError, ["guidance_rescale", "1.5", "[0, 1]"]),
    ({"guidance_rescale": NAN}, OptionError, ["guidance_rescale", "nan"]),
    ({"guidance_interval": (5.0, 1.0)}, OptionError, ["guidance_interval", "(5.0, 1.0)", "0 <= lo < hi"]),
    ({"guidance_interval": (NAN, 1.0)}, OptionError, ["guidance_interval", "nan"]),
    ({"guidance_interval": (1.0,)}, OptionError, ["guidance_interval", "(1.0,)"]),
    ({"num_inference_steps": 0}, OptionError, ["num_inference_steps", "got 0", "[1, 1000]"]),
    ({"num_inference_steps": 10**9}, OptionError, ["num_inference_steps", "1000000000"]),
    ({"num_inference_steps": 2.5}, OptionError, ["num_inference_steps", "2.5"]),
    ({"num_inference_steps": True}, OptionError, ["num_inference_steps", "True"]),
    ({"height": 30}, OptionError, ["height", "30", "multiple of 8", "e.g. 24 or 32"]),
    ({"height": 0}, OptionError, ["height", "got 0"]),
    ({"width": -8}, OptionError, ["width", "-8"]),
    ({"height": "32"}, OptionError, ["height", "'32'"]),
    ({"height": 4096, "width": 4096}, MemoryEstimateError, ["height=4096", "width=4096", "needs about", "GiB",
                                                            "U-Net", "1.0 GiB is available"]),
    ({"num_images_per_prompt": 0}, OptionError, ["num_images_per_prompt", "got 0"]),
    ({"num_images_per_prompt": 10**7}, MemoryEstimateError, ["10000000 images", "needs about", "TiB"]),
    ({"seed": 2**64}, OptionError, ["seed", str(2**64), "[0, 2**64)"]),
    ({"seed": -1}, OptionError, ["seed", "-1"]),
    ({"seed": 1.5}, OptionError, ["seed", "1.5"]),
    ({"seed": [1, 2]}, OptionError, ["seed", "2 seeds for 1 images"]),
    ({"sampler": "plms"}, OptionError, ["sampler", "'plms'", "valid: ["]),
    ({"sampler": "euler", "eta": 0.5}, OptionError, ["eta=0.5", "'euler' has no eta"]),
    ({"sampler": "ddim", "eta": 2.0}, OptionError, ["eta", "2.0", "[0, 1]"]),
    ({"sampler": "ddim", "eta": NAN}, OptionError, ["eta", "nan"]),
    ({"eta": 0.5}, OptionError, ["eta=0.5", "'dpmpp_2m' has no eta"]),  # the default sampler, resolved first
    ({"sigma_schedule": "ays"}, OptionError, ["sigma_schedule", "'ays'", "valid: default, karras"]),
    ({"sigma_schedule": "exponential", "karras_sigmas": True}, OptionError, ["karras_sigmas=True",
                                                                             "sigma_schedule='exponential'"]),
    ({"cache_interval": 0}, OptionError, ["cache_interval", "got 0"]),
    ({"cache_depth": -1}, OptionError, ["cache_depth", "-1"]),
    ({"cache_depth": 6}, OptionError, ["cache_depth", "got 6", "6 skip branches"]),
    ({"output_type": "jpg"}, OptionError, ["output_type", "'jpg'", "pil, np, pt, latent"]),
    ({"strength": 0.0}, OptionError, ["strength", "0.0", "(0, 1]"]),
    ({"strength": 1.5, "image": "init"}, OptionError, ["strength", "1.5"]),
    ({"strength": NAN, "image": "init"}, OptionError, ["strength", "nan"]),
    ({"strength": 0.05, "image": "init", "num_inference_steps": 10}, OptionError, ["strength=0.05", "10 steps",
                                                                                   "leaves no step"]),
    ({"negative_prompt": ["a", "b"]}, OptionError, ["negative_prompt", "2 negative prompts for 1 prompts"]),
    ({"prompt": []}, OptionError, ["prompt", "empty list"]),
    ({"callback": 3}, OptionError, ["callback", "3"]),
    ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, ["latents", "(1, 4, 4, 4)", "(1, 4, 8, 8)"]),
    ({"image": "init", "height": 4096, "width": 4096}, MemoryEstimateError, ["height=4096", "VAE encoder"]),
]


@pytest.mark.parametrize("kwargs, error, needles", API_CASES, ids=[str(i) for i in range(len(API_CASES))])
def test_the_api_refuses_a_bad_option_before_any_network_runs(pipe, no_network, one_gib, kwargs, error, needles):
    kwargs = {"prompt": "a red circle", "num_inference_steps": 2, "progress": False, **kwargs}
    if kwargs.get("image") == "init":
        kwargs["image"] = _image()
    with pytest.raises(error) as info:
        pipe(**kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert no_network == []


@pytest.mark.parametrize("kwargs, needles", [
    ({"device": "cuda:7"}, ["device", "'cuda:7'"]),
    ({"device": "tpu"}, ["device", "'tpu'"]),
    ({"dtype": torch.int8}, ["dtype", "torch.int8"]),
])  # fmt: skip
def test_device_and_dtype_are_checked_by_name(pipe, kwargs, needles):
    if "cuda" in str(kwargs.get("device")) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a CUDA device 7")
    with pytest.raises(OptionError) as info:
        pipe.to(**kwargs)
    for needle in needles:
        assert needle in str(info.value)
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32  # unchanged


def test_the_shared_check_needs_no_model_and_words_messages_for_the_cli():
    opts = check_call_options("x", num_inference_steps=None, seed=2**64 - 1, num_images_per_prompt=2)
    assert opts.num_inference_steps is None and opts.sampler is None  # the model's defaults, resolved later
    assert opts.seeds() == [2**64 - 1, 0] and opts.num_images == 2
    with pytest.raises(OptionError) as info:
        check_call_options("x", num_inference_steps=0)
    assert info.value.message({"num_inference_steps": "--steps"}) == "--steps must be an integer in [1, 1000], got 0"


def test_memory_check_can_be_turned_off(pipe, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1, "available (test)"))
    with pytest.raises(MemoryEstimateError, match="pipe.memory_check = False"):
        pipe("x", num_inference_steps=1, output_type="latent", progress=False)
    pipe.memory_check = False
    try:
        assert pipe("x", num_inference_steps=1, output_type="latent", progress=False).images.shape == (1, 4, 4, 4)
    finally:
        pipe.memory_check = True


def test_the_estimate_grows_with_batch_and_size_and_covers_the_decoded_images(pipe):
    one = pipe.memory_estimate(512, 512, 1)
    assert pipe.memory_estimate(512, 512, 4).total > 3 * (one.total - memory.OVERHEAD)
    assert pipe.memory_estimate(1024, 1024, 1).total > 3 * (one.total - memory.OVERHEAD)
    assert one.decoder >= 512 * 512 * memory.OUTPUT_BYTES  # at least the images' own float32 and uint8 copies
    assert pipe.memory_estimate(512, 512, 1, guided=False).unet < one.unet  # guidance doubles the U-Net's batch
    assert pipe.memory_estimate(512, 512, 1, img2img=True).encoder > 0 == one.encoder


# ---------------------------------------------------------------------------------------------------------- the CLI

CLI_CASES = [  # (arguments after the prompt, what the one line must say: the flag and the value)
    (["--guidance", "nan"], ["--guidance must be a finite number in [0, 100], got nan"]),
    (["--guidance", "inf"], ["--guidance", "got inf"]),
    (["--guidance", "-1"], ["--guidance", "got -1.0"]),
    (["--guidance-rescale", "2"], ["--guidance-rescale", "got 2.0"]),
    (["--guidance-interval", "5", "1"], ["--guidance-interval", "(5.0, 1.0)"]),
    (["--guidance-interval", "nan", "1"], ["--guidance-interval", "nan"]),
    (["--steps", "0"], ["--steps must be an integer in [1, 1000], got 0"]),
    (["--steps", "1000000000"], ["--steps", "1000000000"]),
    (["--seed", str(2**64)], ["--seed must be an integer in [0, 2**64)", str(2**64)]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--seed", "2**70"], ["--seed", "'2**70'"]),
    (["--sampler", "plms"], ["--sampler: unknown sampler 'plms'"]),
    (["--sampler", "euler", "--eta", "0.5"], ["--eta=0.5", "'euler' has no eta"]),
    (["--sampler", "ddim", "--eta", "3"], ["--eta", "got 3.0"]),
    (["--sigma-schedule", "ays"], ["--sigma-schedule: unknown sigma schedule 'ays'"]),
    (["--cache-interval", "0"], ["--cache-interval", "got 0"]),
    (["--cache-depth", "-1"], ["--cache-depth", "-1"]),
    (["--strength", "0.5"], ["--strength needs --image"]),
    (["--image", "{init}", "--strength", "0"], ["--strength", "got 0.0"]),
    (["--image", "{init}", "--strength", "0.05", "--steps", "10"], ["--strength=0.05 with 10 steps"]),
    (["--image", "{tmp}/missing.png"], ["cannot read --image", "missing.png"]),
    (["--num-images", "0"], ["--num-images", "got 0"]),
    (["--height", "0"], ["--height", "got 0"]),
    (["--width", "-8"], ["--width", "-8"]),
    (["--height", "100000", "--width", "100000"], ["--height 100000 --width 100000 needs about", "GiB"]),
    (["--grid", "-n", "2", "--grid-cols", "0"], ["--grid-cols", "got 0"]),
    (["--grid", "-n", "2", "--grid-cols", "5"], ["--grid-cols", "got 5", "at most --num-images"]),
    (["--grid-cols", "2"], ["--grid-cols needs --grid"]),
    (["--grid", "-n", "50000", "--height", "256", "--width", "256"], ["grid of 50000 images", "needs about"]),
    (["--threads", "0"], ["--threads", "got 0"]),
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--dtype", "int8"], ["--dtype", "invalid choice: 'int8'"]),
    (["-o", "{tmp}"], ["is a folder", "give an image file name"]),
    (["-o", "{tmp}/out.xyz"], ["suffix '.xyz'"]),
    (["-o", "{tmp}/nowhere/out.png"], ["output folder", "does not exist"]),
    (["--model", "{tmp}/nowhere", "--steps", "-3"], ["--steps", "-3"]),  # the options before the missing model
]


def _generate(folder: Path, tmp: Path, args: list[str], prompt: str = "a red circle") -> int:
    args = [a.format(tmp=tmp, init=tmp / "init.png") for a in args]
    return main(["generate", prompt, "--model", str(folder), *FAST, "-o", str(tmp / "out.png"), *args])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, needles", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_the_cli_refuses_a_bad_option_before_loading(folder, tmp_path, capsys, no_loading, one_gib, args, needles):
    _image().save(tmp_path / "init.png")
    before = set(tmp_path.iterdir())
    assert _generate(folder, tmp_path, args) == 2
    line = _one_line(capsys)
    for needle in needles:
        assert needle.format(tmp=tmp_path) in line, (needle, line)
    assert no_loading == []
    assert set(tmp_path.iterdir()) == before  # no output file, no temporary file


@pytest.mark.parametrize("args, needles", [
    (["--height", "30"], ["--height must be a positive multiple of 8 (the VAE factor), e.g. 24 or 32, got 30"]),
    (["--cache-interval", "3", "--cache-depth", "6"], ["--cache-depth", "got 6", "6 skip branches"]),
    (["--eta", "0.5"], ["--eta=0.5", "'dpmpp_2m' has no eta"]),  # the model's default sampler
    (["--height", "8192", "--width", "8192"], ["--height 8192 --width 8192: one image needs about", "U-Net",
                                               "1.0 GiB is available", "lower --height and --width"]),
])  # fmt: skip
def test_the_cli_refuses_what_depends_on_the_model_before_any_network_runs(folder, tmp_path, capsys, no_network,
                                                                          one_gib, args, needles):
    assert _generate(folder, tmp_path, args) == 2
    line = _one_line(capsys)
    for needle in needles:
        assert needle in line, (needle, line)
    assert no_network == [] and list(tmp_path.iterdir()) == []


def test_a_huge_size_is_refused_with_an_estimate_before_loading(folder, tmp_path, capsys, no_loading):
    """On any machine with less than 140 GiB available: 100000 x 100000 needs that for the decoded image alone."""
    if memory.available_bytes("cpu") is None or memory.available_bytes("cpu")[0] > 139 * GIB:
        pytest.skip("this machine has no MemAvailable, or more than the floor of 100000 x 100000")
    assert _generate(folder, tmp_path, ["--height", "100000", "--width", "100000"]) == 2
    line = _one_line(capsys)
    assert "--height 100000 --width 100000 needs about 139.7 GiB" in line and "is available" in line
    assert no_loading == []


# ---------------------------------------------------------------------------------------------- batches and files


def test_num_images_are_written_batch_by_batch(folder, tmp_path, capsys, monkeypatch):
    """-n 5 in batches of 2: a batch's files exist before the next batch starts, numbered and seeded in order."""
    from pipelines import cli_generate

    monkeypatch.setattr(cli_generate, "MAX_BATCH", 2)
    seen: list[tuple[int, list[str]]] = []
    call = Pipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((kwargs["num_images_per_prompt"], sorted(p.name for p in tmp_path.iterdir())))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "__call__", spy)
    assert _generate(folder, tmp_path, ["-n", "5", "--seed", "10"]) == 0
    assert seen == [(2, []), (2, ["out-1.png", "out.png"]), (1, ["out-1.png", "out-2.png", "out-3.png", "out.png"])]
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"wrote {tmp_path / name} (seed {10 + i})"
                       for i, name in enumerate(["out.png", "out-1.png", "out-2.png", "out-3.png", "out-4.png"])]


def test_the_batch_is_what_the_estimate_allows(pipe, monkeypatch):
    from pipelines.cli_generate import MAX_BATCH, _batch_size

    three = pipe.memory_estimate(64, 64, 3).total
    monkeypatch.setattr(memory, "available_bytes", lambda device: (2 * three, "available (test)"))
    assert _batch_size(pipe, 64, 64, 100, guided=True, img2img=False) == 3  # half of what is available
    assert _batch_size(pipe, 64, 64, 2, guided=True, img2img=False) == 2  # never more than asked
    monkeypatch.setattr(memory, "available_bytes", lambda device: (10**15, "available (test)"))
    assert _batch_size(pipe, 64, 64, 100, guided=True, img2img=False) == MAX_BATCH
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1, "available (test)"))
    assert _batch_size(pipe, 64, 64, 100, guided=True, img2img=False) == 0  # not one: refused by the caller


def test_an_existing_output_is_replaced_and_a_grid_streams_into_one_file(folder, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert _generate(folder, tmp_path, ["--seed", "1"]) == 0
    first = out.read_bytes()
    assert _generate(folder, tmp_path, ["--seed", "2"]) == 0  # -o exists: replaced, as image tools do
    assert out.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert _generate(folder, tmp_path, ["--seed", "1", "-n", "3", "--grid"]) == 0
    with Image.open(out) as im:
        assert im.size == (64, 64)  # ceil(sqrt(3)) = 2 columns of 32-px tiles, 2 rows
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {out} (3 images, seeds 1 2 3)"


# ------------------------------------------------------------------------------------------------ the error channel


def test_debug_shows_the_traceback_and_the_default_one_line(folder, tmp_path, capsys, no_loading):
    assert main(["generate", "x", "--steps", "0", "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "ldm: error: --steps must be an integer in [1, 1000], got 0\n"
    assert main(["--debug", "generate", "x", "--steps", "0", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "OptionError" in err
    assert err.strip().splitlines()[-1] == "ldm: error: --steps must be an integer in [1, 1000], got 0"


def test_a_bug_shows_its_traceback_and_says_so(folder, tmp_path, capsys, monkeypatch):
    def broken(self, *args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    monkeypatch.setattr(Pipeline, "__call__", broken)
    assert _generate(folder, tmp_path, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("ldm: internal error: AttributeError: 'NoneType' object has no "
                                                   "attribute 'shape' (a bug in ldm")


def test_a_yaml_tag_and_an_unreadable_state_are_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text('run: !!python/object/apply:os.system ["echo hi"]\n')
    assert main(["train", "--config", str(bad)]) == 2
    line = _one_line(capsys)
    assert str(bad) in line and "python/object/apply:os.system" in line

    from ldm.io import WeightsError
    from ldm.training.checkpoint import _torch_load

    state = tmp_path / "unet.optim.pt"
    for data in (b"not a pickle", b""):
        state.write_bytes(data)
        with pytest.raises(WeightsError, match=f"{state}: unreadable checkpoint state"):
            _torch_load(state)


def test_the_option_ranges_are_documented():
    """The ranges the module docstring and docs/cli.md state are the ones checked."""
    from pipelines import call_options

    assert call_options.MAX_STEPS == 1000 and call_options.MAX_GUIDANCE == 100.0
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    for text in ("1-1000", "0-100", "--debug", "replaced", "in batches of at most 8"):
        assert text in docs, text
    assert math.isclose(memory.floor_bytes(1, 100000, 100000) / GIB, 139.7, abs_tol=0.05)
