"""Single-file Stable Diffusion 1.x/2.x checkpoints in the original (CompVis/Stability) key layout.

Configs come from the file's safetensors metadata when we wrote it, otherwise from the SD 1.x / SD 2.x presets in
ldm/configs/ (told apart by the text encoder's layout: CLIP for 1.x, OpenCLIP for 2.x). Every tensor then goes through
the key maps of ldm/loading/convert.py and a strict, shape-checked load that names any bad key.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.config import BUNDLED_CONFIGS, load_config
from ldm.io import MAX_CONFIG_BYTES, ConfigError, WeightsError, build_with_weights, load_state_dict, save_state_dict
from ldm.diffusion.parameterization import PREDICTIONS
from ldm.diffusion.schedule import NoiseSchedule
from ldm.networks.clip_text import CLIPTextConfig, CLIPTextModel
from ldm.networks.text import TextEncoder, assign_hub_state_dict, check_tokenizer_fits, hub_state_dict, meta_text_model
from ldm.networks.tokenizer import EOS, MAX_LENGTH, build_clip_tokenizer
from ldm.networks.text_openclip import openclip_text_fields, openclip_to_transformers, transformers_to_openclip
from ldm.diffusion.schedule import sd_schedule
from ldm.networks.unet import UNet, UNetConfig
from ldm.loading.convert import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    split_single_file,
    unet_from_compvis,
    unet_prefix_map,
    unet_to_compvis,
    vae_from_compvis,
    vae_prefix_map,
    vae_to_compvis,
)
from ldm.loading.components import Components, pipeline_schedule
from ldm.loading.sdxl_single_file import load_sdxl_single_file, sgm_state_and_configs
from ldm.networks.text_sdxl import SDXLTextEncoder

METADATA_KEY = "ldm_configs"
_METADATA_PARTS = ("unet", "vae", "text_encoder", "scheduler")
# CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 (SD 2.x) text towers.
SD1_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
SD2_TEXT_HEADS = 16


def _metadata(path: Path) -> dict[str, Any] | None:
    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        return None
    try:
        configs = json.loads(meta[METADATA_KEY])
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: its {METADATA_KEY} metadata is not valid JSON: {e}") from e
    if not isinstance(configs, dict) or not all(isinstance(configs.get(k), dict) for k in _METADATA_PARTS):
        raise WeightsError(f"{path}: its {METADATA_KEY} metadata must map each of {list(_METADATA_PARTS)} to a config")
    return configs


def checkpoint_family(state: dict[str, torch.Tensor]) -> str:
    """The model family of a CompVis / SGM single file, read off its keys: "SDXL", "SDXL refiner", "SD 2.x" (an
    OpenCLIP text tower) or "SD 1.x", with " inpainting" when the U-Net takes 9 input channels."""
    if any(k.startswith("conditioner.embedders.") for k in state):
        base = any(k.startswith("conditioner.embedders.1.") for k in state)  # CLIP-L and OpenCLIP bigG
        return "SDXL" if base else "SDXL refiner"
    family = "SD 2.x" if any(k.startswith(OPENCLIP_PREFIX) for k in state) else "SD 1.x"
    first = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return family + " inpainting" if first is not None and first.ndim == 4 and first.shape[1] == 9 else family


SUPPORTED_FAMILIES = ("SD 1.x", "SD 2.x", "SD 1.x inpainting", "SD 2.x inpainting", "SDXL")


def _unet_pairs(config: UNetConfig) -> list[tuple[str, str]]:
    return unet_prefix_map(config.block_out_channels, config.layers_per_block, config.down_block_types,
                           config.up_block_types)  # fmt: skip


def _folder_configs(folder: Path) -> dict[str, Any]:
    """The component configs of a diffusers-format pipeline folder, in our metadata's form."""
    from ldm.io import read_json
    from ldm.networks.tokenizer import load_tokenizer

    return {
        "unet": read_json(folder / "unet" / "config.json", max_bytes=MAX_CONFIG_BYTES),
        "vae": read_json(folder / "vae" / "config.json", max_bytes=MAX_CONFIG_BYTES),
        "text_encoder": read_json(folder / "text_encoder" / "config.json", max_bytes=MAX_CONFIG_BYTES),
        "scheduler": read_json(folder / "scheduler" / "scheduler_config.json", max_bytes=MAX_CONFIG_BYTES),
        "pad_token": load_tokenizer(folder / "tokenizer").pad_token,
    }


def _configs(meta: dict[str, Any], where: str) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, NoiseSchedule]:
    """The component configs of `meta` (`_folder_configs` or the file's metadata); errors name `where` and the part."""
    parsers = (("unet", UNetConfig.from_diffusers), ("vae", VAEConfig.from_diffusers),
               ("text_encoder", CLIPTextConfig.from_dict), ("scheduler", NoiseSchedule.from_diffusers))
    configs = []
    for part, parse in parsers:
        try:
            configs.append(parse(meta[part]))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}, {part} config: {e}") from e
    return tuple(configs)  # type: ignore[return-value]


def load_single_file(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    config_folder: str | Path | None = None,
) -> Components:
    """Read a single-file SD checkpoint (`.safetensors`; `.ckpt` only with allow_pickle) into our components.

    Configs: `config_folder` (a pipeline folder whose configs fit the file) if given, else the file's own metadata,
    else the SD 1.x / 2.x presets."""
    path = Path(path)
    state = load_state_dict(path, allow_pickle=allow_pickle)
    family = checkpoint_family(state)
    if family == "SDXL":  # the SGM layout: ldm.loading.sdxl_single_file
        return load_sdxl_single_file(path, state, _metadata(path) if config_folder is None else None,
                                     config_folder=config_folder, prediction_type=prediction_type)
    if family not in SUPPORTED_FAMILIES:
        raise WeightsError(f"{path} is an {family} checkpoint, which is not supported yet (single files of "
                           f"{' and '.join(SUPPORTED_FAMILIES)} are)")
    parts = split_single_file(state)
    meta = _folder_configs(Path(config_folder)) if config_folder is not None else _metadata(path)
    if meta is not None:
        where = str(config_folder) if config_folder is not None else f"{path} ({METADATA_KEY} metadata)"
        unet_cfg, vae_cfg, text_cfg, schedule = _configs(meta, where)
        original = meta["scheduler"] if config_folder is not None else None  # the folder's class and keys
        pad = meta.get("pad_token", EOS)
    else:
        v2 = bool(parts["open_clip"])
        unet_cfg = load_config(UNetConfig, BUNDLED_CONFIGS / ("unet-sd2.yaml" if v2 else "unet-sd15.yaml"))
        if family.endswith("inpainting"):  # latents + mask + masked-image latents on channels
            unet_cfg = dataclasses.replace(unet_cfg, in_channels=2 * unet_cfg.out_channels + 1)
        vae_cfg = load_config(VAEConfig, BUNDLED_CONFIGS / "vae-sd.yaml")
        if v2:
            text_cfg = CLIPTextConfig(**openclip_text_fields(parts["open_clip"], num_heads=SD2_TEXT_HEADS,
                                                             drop_last_layers=1))
            if prediction_type is None:
                warnings.warn("SD 2.x checkpoint: assuming v_prediction (the 768-v models); pass prediction_type="
                              "'epsilon' for the 512 base model", stacklevel=2)
        else:
            text_cfg = CLIPTextConfig(**SD1_TEXT)
        # the scheduler_config.json published with SD 1.x/2.x (PNDM: set_alpha_to_one false, no timestep_spacing, so
        # each sampler takes diffusers' default for its family), as diffusers' own single-file loader uses
        schedule = dataclasses.replace(sd_schedule(), set_alpha_to_one=False, timestep_spacing=None,
                                       prediction_type="v_prediction" if v2 else "epsilon")
        pad = "!" if v2 else EOS
        original = None
    if prediction_type is not None:
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {list(PREDICTIONS)}")
        schedule = dataclasses.replace(schedule, prediction_type=prediction_type)

    try:
        unet = build_with_weights(UNet, unet_cfg, unet_from_compvis(parts["unet"], _unet_pairs(unet_cfg)),
                                  what=f"{path} (unet)")
        vae_pairs = vae_prefix_map(vae_cfg.block_out_channels, vae_cfg.layers_per_block)
        vae = build_with_weights(AutoencoderKL, vae_cfg, vae_from_compvis(parts["vae"], vae_pairs),
                                 what=f"{path} (vae)")
    except WeightsError as e:
        if meta is not None:
            raise
        raise WeightsError(f"{e}. {path} carries no configs and is not shaped as the {family} preset: if it is "
                           "another size, pass config= a pipeline folder whose configs fit it "
                           "(Pipeline.from_pretrained(path, config=folder), ldm ... --model-config FOLDER)") from e
    if parts["open_clip"]:
        text_state = openclip_to_transformers(parts["open_clip"], text_cfg)
    else:
        text_state = {k: v for k, v in parts["clip"].items() if not k.endswith("position_ids")}
    text_model = meta_text_model(text_cfg, text_state, what=f"{path} (text encoder)",  # checked, then given tensors
                                 model_class=CLIPTextModel)  # SD 1.x/2.x: no projection
    assign_hub_state_dict(text_model, text_state, what=f"{path} (text encoder)")
    tokenizer = build_clip_tokenizer(pad, model_max_length=min(MAX_LENGTH, text_cfg.max_position_embeddings))
    check_tokenizer_fits(tokenizer, text_cfg, what=f"{path} (text encoder)")
    text = TextEncoder(tokenizer, text_model.eval())
    schedule = pipeline_schedule(schedule, str(path))  # steps_offset 1, as for folders and diffusers' from_single_file
    components = Components(unet=unet, vae=vae, text_encoder=text, schedule=schedule, scheduler_config=original)
    components.check()
    return components


def text_layout(text_encoder: TextEncoder) -> str:
    """How a single file holds this text encoder: "open_clip" (SD 2.x: `cond_stage_model.model.`, q/k/v fused) for an
    OpenCLIP tower (GELU; OpenAI's CLIP uses quick GELU), else "clip" (SD 1.x: `cond_stage_model.transformer.`)."""
    return "open_clip" if text_encoder.model.config.hidden_act == "gelu" else "clip"


def save_single_file(components: Components, path: str | Path) -> None:
    """Write a single `.safetensors` file in the CompVis layout, configs in its metadata; the text encoder in the
    layout A1111, ComfyUI and diffusers' from_single_file expect for its family (`text_layout`)."""
    from transformers import CLIPTextConfig as Keys  # the keys its metadata has always had

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single files are written as .safetensors only, got {path.name}")
    if isinstance(components.text_encoder, SDXLTextEncoder):  # the SGM layout: ldm.loading.sdxl_single_file
        state, meta = sgm_state_and_configs(components)
        return save_state_dict(state, path, metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
    c = components
    state: dict[str, torch.Tensor] = {}
    for k, v in unet_to_compvis(c.unet.state_dict(), _unet_pairs(c.unet.config)).items():
        state[UNET_PREFIX + k] = v
    vae_pairs = vae_prefix_map(c.vae.config.block_out_channels, c.vae.config.layers_per_block)
    for k, v in vae_to_compvis(c.vae.state_dict(), vae_pairs).items():
        state[VAE_PREFIX + k] = v
    text_state = hub_state_dict(c.text_encoder.model)
    if text_layout(c.text_encoder) == "open_clip":
        for k, v in transformers_to_openclip(text_state, c.text_encoder.model.config).items():
            state[OPENCLIP_PREFIX + k] = v
    else:
        for k, v in text_state.items():
            state[CLIP_PREFIX + k] = v
    text_cfg = {k: v for k, v in c.text_encoder.model.config.to_dict().items()
                if k in Keys().to_dict() and not k.startswith(("_", "transformers_version", "architectures"))}
    meta = {
        "unet": c.unet.config.to_diffusers(),
        "vae": c.vae.config.to_diffusers(),
        "text_encoder": text_cfg,
        "scheduler": pipeline_schedule(c.schedule).to_diffusers(),
        "pad_token": c.text_encoder.tokenizer.pad_token,
    }
    save_state_dict(state, path, metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
