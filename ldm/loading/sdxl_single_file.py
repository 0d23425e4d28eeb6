"""SDXL single-file checkpoints in the original SGM key layout (Stability's generative-models, as A1111 and ComfyUI
read them): `model.diffusion_model.` (the U-Net in CompVis names, its added embedding as `label_emb.0.0` /
`label_emb.0.2`), `first_stage_model.` (the VAE), `conditioner.embedders.0.transformer.` (CLIP-L in transformers'
names) and `conditioner.embedders.1.model.` (OpenCLIP bigG in open_clip's names: fused q/k/v, `text_projection`
(D, P)).

Configs come from a pipeline folder (`config_folder`, as diffusers' from_single_file(config=...)), else from the
file's metadata when we wrote it, else from the SDXL base presets (ldm/configs/unet-sdxl.yaml, the SD VAE at scaling
0.13025, CLIP-L and bigG read off the weights). The single-file entry points of ldm.loading.single_file dispatch here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.config import BUNDLED_CONFIGS, load_config
from ldm.diffusion.parameterization import PREDICTIONS
from ldm.diffusion.schedule import NoiseSchedule, sd_schedule
from ldm.io import MAX_CONFIG_BYTES, ConfigError, WeightsError, build_with_weights, read_json
from ldm.loading.components import Components
from ldm.loading.convert import PrefixMap, UNET_PREFIX, VAE_PREFIX, rename, unet_prefix_map, vae_from_compvis
from ldm.loading.convert import vae_prefix_map, vae_to_compvis
from ldm.networks.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from ldm.networks.text import assign_hub_state_dict, check_tokenizer_fits, hub_state_dict, meta_text_model
from ldm.networks.text_openclip import openclip_text_fields, openclip_to_transformers, transformers_to_openclip
from ldm.networks.text_sdxl import SDXLPromptEncoder, SDXLTextEncoder
from ldm.networks.tokenizer import EOS, MAX_LENGTH, build_clip_tokenizer, load_tokenizer
from ldm.networks.unet import UNet, UNetConfig

SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, transformers' keys
SGM_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG, open_clip's keys
_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip": SGM_CLIP_PREFIX, "open_clip": SGM_OPENCLIP_PREFIX}
_IGNORED = (SGM_OPENCLIP_PREFIX + "logit_scale",)  # CLIP's contrastive temperature: no part of text conditioning
_ADD_EMBEDDING: PrefixMap = [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
# the CLIP ViT-L/14 text tower (SDXL's first encoder); bigG's sizes are read off its weights, at head width 64
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_HEAD_WIDTH = 64


def sgm_unet_pairs(config: UNetConfig) -> PrefixMap:
    """(ours, SGM) module prefixes of an SDXL U-Net: the CompVis map and the added embedding."""
    return unet_prefix_map(config.block_out_channels, config.layers_per_block, config.down_block_types,
                           config.up_block_types) + _ADD_EMBEDDING


def split_sgm(state: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """The file's parts by prefix (prefixes removed); a key of no part is a WeightsError naming it."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in _PREFIXES}
    unknown = []
    for key, value in state.items():
        part = next((name for name, prefix in _PREFIXES.items() if key.startswith(prefix)), None)
        if part is not None:
            parts[part][key[len(_PREFIXES[part]):]] = value
        elif key not in _IGNORED:
            unknown.append(key)
    if unknown:
        raise WeightsError(f"{where}: key(s) of no SDXL part (U-Net, VAE, CLIP-L, OpenCLIP bigG): {unknown[:5]}")
    return parts


def folder_configs(folder: Path) -> dict[str, Any]:
    """The component configs of an SDXL pipeline folder, in our metadata's form."""
    def config(sub: str, name: str = "config.json") -> dict[str, Any]:
        return read_json(folder / sub / name, max_bytes=MAX_CONFIG_BYTES)

    index = read_json(folder / "model_index.json", max_bytes=MAX_CONFIG_BYTES)
    return {"unet": config("unet"), "vae": config("vae"), "text_encoder": config("text_encoder"),
            "text_encoder_2": config("text_encoder_2"), "scheduler": config("scheduler", "scheduler_config.json"),
            "pad_token": load_tokenizer(folder / "tokenizer").pad_token,
            "pad_token_2": load_tokenizer(folder / "tokenizer_2").pad_token,
            "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}


def _parse(meta: dict[str, Any], where: str) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig, CLIPTextConfig,
                                                       NoiseSchedule]:
    parsers = (("unet", UNetConfig.from_diffusers), ("vae", VAEConfig.from_diffusers),
               ("text_encoder", CLIPTextConfig.from_dict), ("text_encoder_2", CLIPTextConfig.from_dict),
               ("scheduler", NoiseSchedule.from_diffusers))
    out = []
    for part, parse in parsers:
        if not isinstance(meta.get(part), dict):
            raise ConfigError(f"{where}: no {part} config")
        try:
            out.append(parse(meta[part]))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}, {part} config: {e}") from e
    return tuple(out)  # type: ignore[return-value]


def _presets(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """SDXL base's configs, bigG's sizes read off the file."""
    width = int(parts["open_clip"]["token_embedding.weight"].shape[1]) if "token_embedding.weight" in \
        parts["open_clip"] else 1280
    bigg = openclip_text_fields(parts["open_clip"], num_heads=max(1, width // OPENCLIP_HEAD_WIDTH))
    vae = dataclasses.replace(load_config(VAEConfig, BUNDLED_CONFIGS / "vae-sd.yaml"), scaling_factor=0.13025)
    return {"unet": load_config(UNetConfig, BUNDLED_CONFIGS / "unet-sdxl.yaml").to_diffusers(),
            "vae": vae.to_diffusers(), "text_encoder": CLIPTextConfig(**CLIP_L_TEXT).to_dict(),
            "text_encoder_2": CLIPTextConfig(**bigg).to_dict(), "scheduler": sd_schedule().to_diffusers(),
            "pad_token": EOS, "pad_token_2": "!", "force_zeros_for_empty_prompt": True}


def _text_encoder(config: CLIPTextConfig, state: dict[str, torch.Tensor], pad: str, cls: type, what: str
                  ) -> SDXLPromptEncoder:
    model = meta_text_model(config, state, what=what, model_class=cls)  # checked, then given tensors
    assign_hub_state_dict(model, state, what=what)
    tokenizer = build_clip_tokenizer(pad, model_max_length=min(MAX_LENGTH, config.max_position_embeddings))
    check_tokenizer_fits(tokenizer, config, what=what)
    return SDXLPromptEncoder(tokenizer, model.eval())


def load_sdxl_single_file(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any] | None, *,
                          config_folder: str | Path | None = None, prediction_type: str | None = None) -> Components:
    """Our components of an SGM-layout SDXL file (`state`: its tensors; `meta`: its metadata's configs, or None)."""
    parts = split_sgm(state, str(path))
    if config_folder is not None:
        meta, where = folder_configs(Path(config_folder)), str(config_folder)
    elif meta is not None:
        where = f"{path} (its metadata)"
    else:
        meta, where = _presets(parts), f"{path} (the SDXL base presets; pass config= a folder for other sizes)"
    unet_cfg, vae_cfg, text_cfg, text_cfg_2, schedule = _parse(meta, where)
    if prediction_type is not None:
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {list(PREDICTIONS)}")
        schedule = dataclasses.replace(schedule, prediction_type=prediction_type)
    try:
        unet = build_with_weights(UNet, unet_cfg, rename(parts["unet"], sgm_unet_pairs(unet_cfg), "to_ours"),
                                  what=f"{path} (unet)")
        vae_pairs = vae_prefix_map(vae_cfg.block_out_channels, vae_cfg.layers_per_block)
        vae = build_with_weights(AutoencoderKL, vae_cfg, vae_from_compvis(parts["vae"], vae_pairs),
                                 what=f"{path} (vae)")
    except WeightsError as e:
        raise WeightsError(f"{e} (configs: {where})") from e
    clip = {k: v for k, v in parts["clip"].items() if not k.endswith("position_ids")}
    first = _text_encoder(text_cfg, clip, meta.get("pad_token", EOS), CLIPTextModel, f"{path} (text encoder)")
    bigg = openclip_to_transformers(parts["open_clip"], text_cfg_2, with_projection=True)
    second = _text_encoder(text_cfg_2, bigg, meta.get("pad_token_2", "!"), CLIPTextModelWithProjection,
                           f"{path} (text encoder 2)")
    text = SDXLTextEncoder(first, second,
                           force_zeros_for_empty_prompt=bool(meta.get("force_zeros_for_empty_prompt", True)))
    original = meta["scheduler"] if config_folder is not None else None  # the folder's class and keys
    components = Components(unet=unet, vae=vae, text_encoder=text, schedule=schedule, scheduler_config=original)
    components.check()
    return components


def sgm_state_and_configs(c: Components) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The SGM-layout tensors of SDXL components, and the configs for the file's metadata."""
    text = c.text_encoder
    if not isinstance(text, SDXLTextEncoder) or text.text_encoder is None:
        raise ValueError("an SDXL single file needs SDXL's two text encoders (the refiner's layout is not written)")
    state: dict[str, torch.Tensor] = {}
    for k, v in rename(c.unet.state_dict(), sgm_unet_pairs(c.unet.config), "to_theirs").items():
        state[UNET_PREFIX + k] = v
    vae_pairs = vae_prefix_map(c.vae.config.block_out_channels, c.vae.config.layers_per_block)
    for k, v in vae_to_compvis(c.vae.state_dict(), vae_pairs).items():
        state[VAE_PREFIX + k] = v
    for k, v in hub_state_dict(text.text_encoder.model).items():
        state[SGM_CLIP_PREFIX + k] = v
    second = text.text_encoder_2.model
    for k, v in transformers_to_openclip(hub_state_dict(second), second.config).items():
        state[SGM_OPENCLIP_PREFIX + k] = v
    meta = {"unet": c.unet.config.to_diffusers(), "vae": c.vae.config.to_diffusers(),
            "text_encoder": text.text_encoder.model.config.to_dict(), "text_encoder_2": second.config.to_dict(),
            "scheduler": c.schedule.to_diffusers(), "pad_token": text.text_encoder.tokenizer.pad_token,
            "pad_token_2": text.text_encoder_2.tokenizer.pad_token,
            "force_zeros_for_empty_prompt": text.force_zeros_for_empty_prompt}
    return {k: v.detach().contiguous() for k, v in state.items()}, meta
