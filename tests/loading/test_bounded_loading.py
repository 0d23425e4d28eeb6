"""Loading is bounded by the weights present (issue 31): a config that asks for huge dimensions, thousands of layers or
huge tables is refused, naming the file and key, before anything of its size is allocated and in well under a second;
a malformed config or tokenizer file is named; the normal folders and the bundled model load as before."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.io import ConfigError, WeightsError, build_on_meta, read_header, save_state_dict
from ldm.loading.components import load_pipeline_folder, save_pipeline
from ldm.loading.single_file import METADATA_KEY, load_single_file, save_single_file
from ldm.loading.sources import DEFAULT_MODEL
from pipelines.tiny import tiny_components
from tests._helpers import ROOT, same_weights

# (what the crafted folder changes: file, key, value; the error's type and what it must say, the file and key named)
CRAFTED = {
    "text hidden size": ("text_encoder/config.json", {"hidden_size": 2**20, "intermediate_size": 2**22}, "WeightsError",
                         r"text_encoder: .*position_embedding.weight: expected shape \(77, 1048576\)"),
    "text vocabulary": ("text_encoder/config.json", {"vocab_size": 10**9}, "WeightsError",
                        r"text_encoder: .*token_embedding.weight: expected shape \(1000000000, 32\)"),
    "text positions": ("text_encoder/config.json", {"max_position_embeddings": 10**9}, "WeightsError",
                       r"text_encoder: .*position_embedding.weight: expected shape \(1000000000, 32\)"),
    "text layers": ("text_encoder/config.json", {"num_hidden_layers": 20_000}, "WeightsError",
                    r"text_encoder: the config's num_hidden_layers asks for 20000 where the weights hold 2"),
    "unet channels": ("unet/config.json", {"block_out_channels": [2**20, 2**21]}, "WeightsError",
                      r"unet: shape mismatch .*conv_in.weight: model \(1048576, 4, 3, 3\)"),
    "unet cross-attention": ("unet/config.json", {"cross_attention_dim": 2**30}, "WeightsError",
                             r"unet: shape mismatch .*attn2.to_k.weight: model \(32, 1073741824\)"),
    "unet layers": ("unet/config.json", {"layers_per_block": 5000}, "WeightsError",
                    r"unet: the config's layers_per_block asks for 5000 where the weights hold 2"),
    "unet transformer layers": ("unet/config.json", {"transformer_layers_per_block": 5000}, "WeightsError",
                                r"unet: the config's transformer_layers_per_block asks for 5000"),
    "unet blocks": ("unet/config.json", {"block_out_channels": [32] * 3000, "attention_head_dim": 1,
                                         "down_block_types": ["DownBlock2D"] * 3000,
                                         "up_block_types": ["UpBlock2D"] * 3000},
                    "WeightsError", r"unet: the config's block_out_channels asks for 3000 where the weights hold 2"),
    "unet sample size": ("unet/config.json", {"sample_size": 10**6}, "ConfigError",
                         r"unet/config.json: .*sample_size 1000000 is past 1024"),
    "vae layers": ("vae/config.json", {"layers_per_block": 5000}, "WeightsError",
                   r"vae: the config's layers_per_block asks for 5000 where the weights hold 1"),
    "vae channels": ("vae/config.json", {"block_out_channels": [2**20] * 4, "norm_num_groups": 1}, "WeightsError",
                     r"vae: .*shape mismatch .*encoder.conv_in.weight: model \(1048576, 3, 3, 3\)"),
    "timesteps": ("scheduler/scheduler_config.json", {"num_train_timesteps": 10**12}, "ConfigError",
                  r"scheduler/scheduler_config.json: .*num_train_timesteps must be an integer in \[2, 100000\]"),
    "prompt length": ("tokenizer/tokenizer_config.json", {"model_max_length": 10**5}, "ConfigError",
                      r"tokenizer/tokenizer_config.json: model_max_length must be an integer in \[1, 8192\]"),
    "prompt length past the positions": ("tokenizer/tokenizer_config.json", {"model_max_length": 1000}, "ConfigError",
                                         r"prompt-length-past-the-positions: the tokenizer pads prompts to 1000 "
                                         r"tokens \(model_max_length\), past the text model's 77 positions"),
}
# A U-Net built from its config alone (a training run's frozen folder, unet_weights=False) and single files whose
# metadata carries the configs
CRAFTED_WITHOUT_WEIGHTS = {
    "frozen unet layers": ("unet/config.json", {"layers_per_block": 5000}, "WeightsError",
                           r"unet/config.json: the config asks for a module of more than 5000 tensors"),
    "frozen unet channels": ("unet/config.json", {"block_out_channels": [2**20, 2**21]}, "ConfigError",
                             r"unet/config.json: the config asks for a U-Net of .* parameters, past"),
}
CRAFTED_SINGLE_FILE = {
    "single-file text layers": ("text_encoder", {"num_hidden_layers": 20_000}, "WeightsError",
                                r"\(text encoder\): the config's num_hidden_layers asks for 20000"),
    "single-file unet layers": ("unet", {"layers_per_block": 5000}, "WeightsError",  # the key map follows the config
                                r"\(unet\): the config's \w+ asks for \d+ where the weights hold"),
}
# What loading may allocate beyond a normal load of the tiny folder, and the time it may take, on a loaded machine
RSS_BOUND_MB, SECONDS_BOUND = 200, 2.0

_CHILD = r"""
import json, resource, sys, time
from ldm.loading.components import load_pipeline_folder
from ldm.loading.single_file import load_single_file
normal, cases = json.loads(sys.argv[1])
load_pipeline_folder(normal)  # every lazy import and cache warm: what follows is the crafted configs' own cost
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far, MB
baseline, results = rss(), {}
# a regression fails to allocate here (a wrong error, a failed test) rather than taking the machine's memory (Linux)
try:
    mapped = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
except (OSError, ValueError):
    pass
for name, (path, how) in cases.items():
    start = time.perf_counter()
    try:
        load_single_file(path) if how == "file" else load_pipeline_folder(path, unet_weights=how != "frozen")
        error = ([], "loaded")
    except Exception as e:
        error = ([kind.__name__ for kind in type(e).__mro__], str(e))
    results[name] = {"error": error, "seconds": time.perf_counter() - start, "peak_mb": rss() - baseline}
print(json.dumps(results))
"""


def _patched_json(path: Path, changes: dict) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    c = tiny_components(seed=0)
    path = tmp_path_factory.mktemp("bounded") / "tiny"
    save_pipeline(path, unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    save_single_file(c, path.parent / "tiny.safetensors")
    return path


@pytest.fixture(scope="module")
def crafted_results(tiny_folder) -> dict:
    """Every crafted folder loaded in one fresh interpreter, each timed and its peak memory read (ru_maxrss)."""
    root = tiny_folder.parent
    cases = {}
    for table, how in ((CRAFTED, "folder"), (CRAFTED_WITHOUT_WEIGHTS, "frozen")):
        for name, (file, changes, _, _) in table.items():
            folder = root / name.replace(" ", "-")
            shutil.copytree(tiny_folder, folder)
            _patched_json(folder / file, changes)
            cases[name] = (str(folder), how)
    for name, (part, changes, _, _) in CRAFTED_SINGLE_FILE.items():
        path = root / f"{name.replace(' ', '-')}.safetensors"
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        with safe_open(str(root / "tiny.safetensors"), framework="pt") as f:
            configs = json.loads(f.metadata()[METADATA_KEY])
        configs[part].update(changes)
        save_file(load_file(root / "tiny.safetensors"), path, metadata={METADATA_KEY: json.dumps(configs)})
        cases[name] = (str(path), "file")
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([str(tiny_folder), cases])], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [*CRAFTED, *CRAFTED_WITHOUT_WEIGHTS, *CRAFTED_SINGLE_FILE])
def test_a_config_asking_for_more_than_its_weights_is_refused_fast_and_small(crafted_results, name):
    """Refused with the file and the key named, in well under a second, without allocating what the config asks."""
    _, _, kind, message = {**CRAFTED, **CRAFTED_WITHOUT_WEIGHTS, **CRAFTED_SINGLE_FILE}[name]
    result = crafted_results[name]
    kinds, error = result["error"]
    assert kind in kinds, result
    assert re.search(message, error), error
    assert result["seconds"] < SECONDS_BOUND, result
    assert result["peak_mb"] < RSS_BOUND_MB, result


def test_refused_before_any_tensor_is_read(tiny_folder, tmp_path, monkeypatch):
    """The config is checked against the weight file's header: the tensors are never read for a crafted config."""
    import ldm.io
    import ldm.networks.text

    def no_reading(*args, **kwargs):
        raise AssertionError("tensor data was read before the config was checked")

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    _patched_json(folder / "unet" / "config.json", {"cross_attention_dim": 2**30})
    _patched_json(folder / "text_encoder" / "config.json", {"hidden_size": 2**20, "num_attention_heads": 1})
    monkeypatch.setattr(ldm.io, "load_state_dict", no_reading)
    monkeypatch.setattr(ldm.networks.text, "load_state_dict", no_reading)
    from ldm.networks.text import TextEncoder
    from ldm.networks.unet import UNet

    with pytest.raises(WeightsError, match="attn2.to_k.weight: model"):
        UNet.from_pretrained(folder / "unet")
    with pytest.raises(WeightsError, match="position_embedding.weight: expected shape"):
        TextEncoder.from_pretrained(folder)
    from safetensors.torch import load_file, save_file

    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "decoder.conv_out.bias": torch.zeros(3, dtype=torch.int64)}, weights)
    from autoencoder.model import AutoencoderKL

    with pytest.raises(WeightsError, match=r"wrong kind .*decoder.conv_out.bias: int64 where the model holds float32"):
        AutoencoderKL.from_pretrained(folder / "vae")


def test_the_header_is_read_without_the_tensors(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.int64), "c": torch.ones(5).half()}
    save_state_dict(state, tmp_path / "w.safetensors")
    header = read_header(tmp_path / "w.safetensors")
    assert {k: (tuple(t.shape), t.dtype, t.is_meta) for k, t in header.items()} == {
        k: (tuple(t.shape), t.dtype, True) for k, t in state.items()}
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match=r"bad.safetensors is not a readable safetensors file"):
        read_header(tmp_path / "bad.safetensors")


def test_a_module_larger_than_its_weights_stops_building():
    """Without layer counts to name, the tensor budget alone stops the build, naming what asked."""
    spec = {"0.weight": torch.empty(2, 2, device="meta")}
    with pytest.raises(WeightsError, match=r"toy: the config asks for a module of more than 2050 tensors, where the "
                                           r"weights hold 1"):
        build_on_meta(lambda: torch.nn.Sequential(*(torch.nn.Linear(2, 2) for _ in range(100_000))), spec, what="toy")


@pytest.mark.parametrize("file", [
    "unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
    "tokenizer/vocab.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
])
def test_a_file_that_is_not_json_is_named(tiny_folder, tmp_path, file):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    if file.endswith("special_tokens_map.json"):  # read only when tokenizer_config.json names no pad token
        config = json.loads((folder / "tokenizer/tokenizer_config.json").read_text())
        del config["pad_token"]
        (folder / "tokenizer/tokenizer_config.json").write_text(json.dumps(config))
    (folder / file).write_text("not json {")
    with pytest.raises(WeightsError, match=rf"{file} is not valid JSON: Expecting value: line 1 column 1"):
        load_pipeline_folder(folder)


def test_malformed_tokenizer_files_are_named(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    merges = folder / "tokenizer" / "merges.txt"
    merges.write_text(merges.read_text() + "a b c\n")
    with pytest.raises(ConfigError, match=r"merges.txt, line \d+: expected a pair of tokens, got 'a b c'"):
        load_pipeline_folder(folder)
    shutil.copy(tiny_folder / "tokenizer" / "merges.txt", merges)
    _patched_json(folder / "tokenizer" / "vocab.json", {"hello</w>": "7"})
    with pytest.raises(ConfigError, match=r"vocab.json: token 'hello</w>' has id '7', not an integer >= 0"):
        load_pipeline_folder(folder)
    shutil.copy(tiny_folder / "tokenizer" / "vocab.json", folder / "tokenizer" / "vocab.json")
    (folder / "tokenizer" / "added_tokens.json").write_text(json.dumps({"<new>": 10**9}))
    with pytest.raises(ConfigError, match=r"tokenizer: added token '<new>' has id 1000000000"):
        load_pipeline_folder(folder)


def test_a_yaml_config_that_does_not_parse_is_named(tmp_path):
    from ldm.config import load_config
    from ldm.networks.unet import UNetConfig

    (tmp_path / "unet.yaml").write_text("block_out_channels: [32, 64\n")
    with pytest.raises(ConfigError, match=r"unet.yaml is not valid YAML"):
        load_config(UNetConfig, tmp_path / "unet.yaml")


def test_single_file_metadata_that_is_not_json_is_named(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(tiny_folder.parent / "tiny.safetensors"), tmp_path / "m.safetensors",
              metadata={METADATA_KEY: "{not json"})
    with pytest.raises(WeightsError, match=rf"m.safetensors: its {METADATA_KEY} metadata is not valid JSON"):
        load_single_file(tmp_path / "m.safetensors")


def test_normal_folders_and_the_bundled_model_load_their_files_exactly(tiny_folder, tmp_path):
    """The checks refuse nothing a normal folder holds: every tensor is the file's, bit for bit (pickle weights too)."""
    from safetensors.torch import load_file

    from ldm.networks.text import hub_state_dict
    from ldm.networks.unet import UNet

    for folder in (tiny_folder, DEFAULT_MODEL):
        c = load_pipeline_folder(folder)
        assert same_weights(c.unet, load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        assert same_weights(c.vae, load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
        text = load_file(folder / "text_encoder" / "model.safetensors")
        assert same_weights(hub_state_dict(c.text_encoder.model), text)
    unet = tmp_path / "unet"
    shutil.copytree(tiny_folder / "unet", unet)
    weights = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, unet / "diffusion_pytorch_model.bin")
    assert same_weights(UNet.from_pretrained(unet, allow_pickle=True), weights)
