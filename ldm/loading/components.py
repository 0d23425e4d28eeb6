"""The four components of a latent text-to-image model and their folder in diffusers' Stable Diffusion layout:
model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/. A folder we write loads in diffusers'
StableDiffusionPipeline, and a folder diffusers writes loads here."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


from autoencoder.model import AutoencoderKL
from ldm.io import MAX_CONFIG_BYTES, ConfigError, atomic_directory, read_config, read_json, tensor_budget, write_json
from ldm.diffusion.schedule import NoiseSchedule
from ldm.diffusion.variances import is_learned
from ldm.networks.text import TextEncoder
from ldm.networks.unet import UNet, UNetConfig
from ldm.loading.sdxl import load_sdxl_text_encoder, sdxl_model_index, sdxl_problems, sdxl_subfolders
from ldm.networks.text_sdxl import SDXLTextEncoder

# The scheduler class diffusers instantiates from our scheduler/ folder; its config carries our schedule.
DEFAULT_SCHEDULER_CLASS = "EulerDiscreteScheduler"
PIPELINE_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class IncompatibleComponentsError(ValueError):
    """Components that cannot work together (e.g. text width != cross-attention width)."""


@dataclass
class Components:
    """The four parts of a latent text-to-image model."""

    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder | SDXLTextEncoder
    schedule: NoiseSchedule
    # The scheduler_config.json the schedule was read from (None: ours): its class and the keys we do not model are
    # written back as they were, so a re-saved folder samples in diffusers as the original did
    scheduler_config: dict[str, Any] | None = None

    def check(self) -> None:
        """Raise IncompatibleComponentsError naming the sizes that do not fit together."""
        check_components(self.unet, self.vae, self.text_encoder, self.schedule)


def check_components(unet: UNet, vae: AutoencoderKL, text_encoder: TextEncoder | SDXLTextEncoder,
                     schedule: NoiseSchedule | None = None) -> None:
    """The text embedding width must equal the U-Net's cross-attention width, and the VAE's latent channels its
    input and output channels (twice them with a variance head, which `schedule`'s variance_type must name)."""
    problems = []
    if text_encoder.hidden_size != unet.config.cross_attention_dim:
        problems.append(
            f"the text encoder's embedding size is {text_encoder.hidden_size} but the U-Net's cross_attention_dim is "
            f"{unet.config.cross_attention_dim}"
        )
    latent = vae.config.latent_channels
    out = 2 * latent if schedule is not None and is_learned(schedule.variance_type) else latent  # eps [+ variance]
    if (unet.config.in_channels != latent and not is_inpainting(unet, vae)) or unet.config.out_channels != out:
        problems.append(
            f"the VAE has {latent} latent channels but the U-Net takes {unet.config.in_channels} (valid: {latent}, or "
            f"{2 * latent + 1} for inpainting) and returns {unet.config.out_channels} (valid: {out}; {2 * latent} "
            "with a variance head, when the scheduler config's variance_type is 'learned_range' or 'learned')"
        )
    problems += sdxl_problems(unet, text_encoder)  # SDXL's pooled embedding and added conditioning
    if problems:
        raise IncompatibleComponentsError("components do not fit together: " + "; ".join(problems))


def is_inpainting(unet: UNet, vae: AutoencoderKL) -> bool:
    """Whether the U-Net takes latents + mask + masked-image latents on channels (SD-inpainting: 4 + 1 + 4 = 9)."""
    return unet.config.in_channels == 2 * vae.config.latent_channels + 1


def model_index(scheduler_class: str = DEFAULT_SCHEDULER_CLASS) -> dict[str, object]:
    """diffusers' model_index.json for a StableDiffusionPipeline without safety checker."""
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def scheduler_class(original: dict[str, Any] | None) -> str:
    """The diffusers scheduler class a folder names (that of `original`, a scheduler_config.json), else ours."""
    name = (original or {}).get("_class_name")
    return name if isinstance(name, str) and name else DEFAULT_SCHEDULER_CLASS


def save_schedule(schedule: NoiseSchedule, folder: str | Path, original: dict[str, Any] | None = None) -> None:
    """Write `scheduler_config.json`: our schedule's keys over `original` (the config it was read from: its class and
    the keys we do not model, e.g. PNDM's skip_prk_steps, are kept), or for EulerDiscreteScheduler when None."""
    import diffusers

    ours = {f.name for f in dataclasses.fields(NoiseSchedule)}  # ours say it all, None (left out) included
    kept = {k: v for k, v in (original or {}).items() if k not in ours}
    config = {**kept, "_class_name": scheduler_class(original), "_diffusers_version": diffusers.__version__,
              **schedule.to_diffusers()}
    write_json(config, Path(folder) / "scheduler_config.json")


def load_schedule(folder: str | Path) -> NoiseSchedule:
    """Read a diffusers `scheduler_config.json` (any scheduler class) as our NoiseSchedule; errors name the file."""
    return read_config(Path(folder) / "scheduler_config.json", NoiseSchedule.from_diffusers)


def pipeline_schedule(schedule: NoiseSchedule, where: str | None = None) -> NoiseSchedule:
    """The schedule a Stable Diffusion pipeline folder samples with: steps_offset 1. diffusers' StableDiffusionPipeline
    sets it whatever the folder says (a deprecation rewrite in its __init__), so a folder that says otherwise samples
    other timesteps there than its own config names; we follow diffusers, and warn naming `where` when given."""
    if schedule.steps_offset == 1:
        return schedule
    if where is not None:
        warnings.warn(f"{where}: steps_offset is {schedule.steps_offset}; sampling with 1, as diffusers' "
                      "StableDiffusionPipeline does for every pipeline folder (re-save the folder to record it)",
                      stacklevel=3)
    return dataclasses.replace(schedule, steps_offset=1)


def save_pipeline(
    folder: str | Path,
    *,
    unet: UNet,
    vae: AutoencoderKL,
    text_encoder: TextEncoder | SDXLTextEncoder,
    schedule: NoiseSchedule,
    scheduler_config: dict[str, Any] | None = None,
    unet_weights: bool = True,
    overwrite: bool = False,
) -> None:
    """Write a diffusers-format pipeline folder (safetensors weights). The folder appears whole or not at all.
    unet_weights=False writes only the U-Net's config (a training run's frozen parts; export adds the weights)."""
    check_components(unet, vae, text_encoder, schedule)
    # a pipeline folder (ours or diffusers') is replaced; a folder of anything else only with overwrite=True
    with atomic_directory(folder, may_replace=lambda p: overwrite or is_pipeline_folder(p)) as tmp:
        if unet_weights:
            unet.save_pretrained(tmp / "unet")
        else:
            write_json({"_class_name": "UNet2DConditionModel", **unet.config.to_diffusers()}, tmp / "unet" / "config.json")
        vae.save_pretrained(tmp / "vae")
        text_encoder.save_pretrained(tmp)  # text_encoder/ and tokenizer/
        save_schedule(pipeline_schedule(schedule), tmp / "scheduler", scheduler_config)
        index = model_index(scheduler_class(scheduler_config)) if not isinstance(text_encoder, SDXLTextEncoder) \
            else sdxl_model_index(scheduler_class(scheduler_config), text_encoder)
        if is_inpainting(unet, vae):  # diffusers' inpainting class of the family (StableDiffusion[XL]InpaintPipeline)
            index["_class_name"] = str(index["_class_name"]).replace("Pipeline", "InpaintPipeline")
        write_json(index, tmp / "model_index.json")


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def load_pipeline_folder(
    folder: str | Path,
    *,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = None,
    unet_weights: bool = True,
) -> Components:
    """Load a diffusers-format pipeline folder (ours or diffusers') into our modules, with errors naming the part.
    unet_weights=False builds the U-Net from its config alone (random weights, for a checkpoint to fill)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not is_pipeline_folder(folder):
        raise FileNotFoundError(f"{folder} is not a pipeline folder: model_index.json is missing")
    if read_json(folder / "model_index.json", max_bytes=MAX_CONFIG_BYTES).get("_class_name") == \
            "StableDiffusionUpscalePipeline":  # ldm.loading.upscaler
        raise ValueError(f"{folder} is an upscaler (StableDiffusionUpscalePipeline), not a text-to-image model: load "
                         "it with pipelines.Upscaler.from_pretrained, or as ldm generate --upscale FOLDER")
    missing = [name for name in sdxl_subfolders(folder) or PIPELINE_SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is incomplete: missing subfolder(s) {missing}")
    if unet_weights:
        unet = UNet.from_pretrained(folder / "unet", allow_pickle=allow_pickle, dtype=dtype)
    else:
        unet = _unet_without_weights(folder / "unet" / "config.json")
        unet = unet.to(dtype) if dtype is not None else unet
    components = Components(
        unet=unet.eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", allow_pickle=allow_pickle, dtype=dtype).eval(),
        text_encoder=(load_sdxl_text_encoder(folder, dtype)  # SDXL's two encoders (ldm.loading.sdxl), else one
                      or TextEncoder.from_pretrained(folder, dtype=dtype)).eval(),
        schedule=pipeline_schedule(load_schedule(folder / "scheduler"), str(folder / "scheduler")),
        scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json", max_bytes=MAX_CONFIG_BYTES),
    )
    components.check()
    return components


# A U-Net built from its config alone (a training run's frozen folder) has no weights to bound it: SD 1.x's has 686
# tensors and 860 M parameters; a config asking for more than these bounds is refused before anything is allocated
MAX_UNET_TENSORS, MAX_UNET_PARAMETERS = 5_000, 4 * 10**9


def _unet_without_weights(path: Path) -> UNet:
    """UNet(config) with random weights, after the size the config asks for is checked on the meta device."""
    config = read_config(path, UNetConfig.from_diffusers)
    with torch.device("meta"), tensor_budget(MAX_UNET_TENSORS, what=str(path)):
        size = sum(p.numel() for p in UNet(config).parameters())
    if size > MAX_UNET_PARAMETERS:
        raise ConfigError(f"{path}: the config asks for a U-Net of {size:,} parameters, past {MAX_UNET_PARAMETERS:,}")
    return UNet(config)
