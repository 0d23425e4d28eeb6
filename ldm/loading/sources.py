"""One entry point for every model source: a pipeline folder, a single-file checkpoint, a hub name."""

from __future__ import annotations

from pathlib import Path

from ldm.io import PICKLE_SUFFIXES
from ldm.loading.components import Components, is_pipeline_folder, load_pipeline_folder
from ldm.loading.single_file import load_single_file


# The bundled default model: data of the distribution, installed beside the packages (pipelines/default_model), named
# "default" wherever a model path is asked for (model.pretrained: default)
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "pipelines" / "default_model"


# How Pipeline() samples the bundled model unless told otherwise: the fewest network evaluations whose adherence is
# within noise of the best measured (benchmarks/defaults.py -> benchmarks/results/defaults.md: Euler at 10 steps,
# 74% mean all-correct against 78% for DPM-Solver++(2M) at 20, within 1.96 paired standard errors). Other models
# sample with DPM-Solver++(2M) at 30 steps (SAMPLING_DEFAULTS).
BUNDLED_SAMPLING = {"sampler": "euler", "num_inference_steps": 10}
SAMPLING_DEFAULTS = {"sampler": "dpmpp_2m", "num_inference_steps": 30}


def is_bundled(path: str | Path) -> bool:
    """Whether `path` names the bundled default model ("default", or its folder)."""
    if str(path) == "default" and not Path("default").exists():
        return True
    try:
        return Path(path).expanduser().resolve() == DEFAULT_MODEL
    except OSError:
        return False


def sampling_defaults(path: str | Path) -> dict[str, object]:
    """The sampler and step count a pipeline loaded from `path` uses when the call names none."""
    return dict(BUNDLED_SAMPLING if is_bundled(path) else SAMPLING_DEFAULTS)


class ModelNotFoundError(FileNotFoundError):
    """No model at the given path, and it is not a reachable hub name."""


# The bundled model's 64 -> 256 super-resolution stage (docs/cascade.md): a StableDiffusionUpscalePipeline folder
# beside the model's parts, named "default" by Upscaler.from_pretrained, Cascade() and `ldm generate --upscale`
DEFAULT_UPSCALER = DEFAULT_MODEL / "upscaler"

# How an Upscaler samples when the call names none: for the bundled stage the settings benchmarks/cascade.py swept
# (strength decides; the others move nothing outside noise: docs/cascade.md "The bundled 64 -> 256 stage"); for other
# folders diffusers' x4-upscaler call defaults (noise level 20, guidance 9, from the prior) with DPM-Solver++(2M) at
# 30 steps
BUNDLED_UPSCALER_SAMPLING = {"sampler": "dpmpp_2m", "num_inference_steps": 20, "noise_level": 20, "guidance_scale": 1.0,
                             "strength": 0.4}
UPSCALER_SAMPLING = {"sampler": "dpmpp_2m", "num_inference_steps": 30, "noise_level": 20, "guidance_scale": 9.0,
                     "strength": 1.0}


def is_bundled_upscaler(path: str | Path) -> bool:
    """Whether `path` names the bundled super-resolution stage ("default", or its folder)."""
    if str(path) == "default" and not Path("default").exists():
        return True
    try:
        return Path(path).expanduser().resolve() == DEFAULT_UPSCALER.resolve()
    except OSError:
        return False


def upscaler_folder(path: str | Path) -> Path:
    """The upscaler folder `path` names: "default" (unless a path of that name exists) is the bundled stage, an error
    saying so where it is missing."""
    if not is_bundled_upscaler(path):
        return Path(path).expanduser()
    if not (DEFAULT_UPSCALER / "model_index.json").is_file():
        raise ModelNotFoundError(f"the bundled super-resolution stage is missing from {DEFAULT_UPSCALER} (no "
                                 "model_index.json); reinstall the package, or pass an upscaler folder (a "
                                 "StableDiffusionUpscalePipeline folder, docs/cascade.md)")
    return DEFAULT_UPSCALER


def upscaler_sampling_defaults(path: str | Path) -> dict[str, object]:
    """The sampler, step count, noise level and guidance scale an Upscaler loaded from `path` uses when the call
    names none."""
    return dict(BUNDLED_UPSCALER_SAMPLING if is_bundled_upscaler(path) else UPSCALER_SAMPLING)


def load_components(path: str | Path, *, allow_pickle: bool = False, config: str | Path | None = None) -> Components:
    """Load components from a pipeline folder, a single `.safetensors` (or, with allow_pickle, `.ckpt`) file, or a
    Hugging Face hub name "owner/name" (downloaded through huggingface_hub when a hub is reachable); "default" is the
    bundled model, unless a path of that name exists. `config`: for a
    single file, a pipeline folder whose configs fit it (diffusers' from_single_file(config=...)), for sizes the
    file's metadata and the SD presets do not give."""
    p = Path(path).expanduser()
    if str(path) == "default" and not p.exists():
        p = DEFAULT_MODEL
    if p == DEFAULT_MODEL and not (p / "model_index.json").is_file():
        raise ModelNotFoundError(f"the bundled default model is missing from {DEFAULT_MODEL}; reinstall the package, "
                                 "or pass a model folder or checkpoint to Pipeline.from_pretrained")
    if config is not None and not p.is_file():
        raise ValueError(f"config= is for single-file checkpoints, but {path} is not a file")
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise FileNotFoundError(f"config={config} is not a pipeline folder (no model_index.json)")
    if p.is_dir():
        return load_pipeline_folder(p, allow_pickle=allow_pickle)
    if p.is_file():
        return load_single_file(p, allow_pickle=allow_pickle, config_folder=config)
    name = str(path)
    looks_local = p.suffix in (".safetensors", *PICKLE_SUFFIXES) or name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise ModelNotFoundError(f"no model folder or checkpoint file at {path}")
    return _from_hub(name, allow_pickle)


def _from_hub(repo_id: str, allow_pickle: bool) -> Components:
    """Download a diffusers-format repo (safetensors and configs only) and load it as a folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"])
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path, and it could not be fetched from the Hugging Face hub (no hub is "
            f"reachable from here, or the repo does not exist): pass a local pipeline folder or .safetensors file. ({e})"
        ) from e
    if not is_pipeline_folder(folder):
        raise ModelNotFoundError(f"hub repo {repo_id!r} has no model_index.json: not a diffusers pipeline")
    return load_pipeline_folder(folder, allow_pickle=allow_pickle)
