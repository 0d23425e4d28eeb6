"""SDXL pipeline folders (diffusers' StableDiffusionXLPipeline layout): model_index.json with text_encoder_2/ and
tokenizer_2/ beside the Stable Diffusion subfolders, and `force_zeros_for_empty_prompt`; the checks that an SDXL U-Net
and its text encoders fit together (ldm.networks.added_conditioning, ldm.networks.text_sdxl)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.io import MAX_CONFIG_BYTES, read_json
from ldm.networks.added_conditioning import NUM_TIME_IDS
from ldm.networks.text_sdxl import SDXLTextEncoder
from ldm.networks.unet import UNet

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
SDXL_SUBFOLDERS = ("text_encoder_2", "tokenizer_2")


def sdxl_subfolders(folder: str | Path) -> tuple[str, ...] | None:
    """The subfolders an SDXL pipeline folder must have (the refiner's model_index.json names no text_encoder /
    tokenizer: null entries), or None when the folder is not an SDXL pipeline."""
    index = read_json(Path(folder) / "model_index.json", max_bytes=MAX_CONFIG_BYTES)
    if index.get("_class_name") not in SDXL_PIPELINES:
        return None
    first = [name for name in ("text_encoder", "tokenizer")
             if not (isinstance(entry := index.get(name), list) and entry and entry[0] is None)]
    return ("unet", "vae", "scheduler", *first, *SDXL_SUBFOLDERS)


def _flag(index: dict[str, Any], key: str, default: bool, where: Path) -> bool:
    value = index.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def load_sdxl_text_encoder(folder: str | Path, dtype: Any = None) -> SDXLTextEncoder | None:
    """SDXL's text encoders of a pipeline folder (with model_index.json's force_zeros_for_empty_prompt and
    requires_aesthetics_score, defaults True and False as in diffusers), or None when the folder is not SDXL's."""
    folder = Path(folder)
    needed = sdxl_subfolders(folder)
    if needed is None:
        return None
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} is an SDXL pipeline folder without its subfolder(s) {missing}")
    where = folder / "model_index.json"
    index = read_json(where, max_bytes=MAX_CONFIG_BYTES)
    return SDXLTextEncoder.from_pretrained(
        folder, dtype=dtype, first="text_encoder" in needed,
        force_zeros_for_empty_prompt=_flag(index, "force_zeros_for_empty_prompt", True, where),
        requires_aesthetics_score=_flag(index, "requires_aesthetics_score", False, where))


def sdxl_model_index(scheduler_class: str, text_encoder: SDXLTextEncoder) -> dict[str, object]:
    """diffusers' model_index.json for a StableDiffusionXLPipeline, or for the refiner (no first text encoder) a
    StableDiffusionXLImg2ImgPipeline with requires_aesthetics_score (no watermarker: the folder says nothing of it)."""
    import diffusers

    first = text_encoder.text_encoder is not None
    index: dict[str, object] = {
        "_class_name": "StableDiffusionXLPipeline" if first else "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": text_encoder.force_zeros_for_empty_prompt,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"] if first else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if first else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if not first or text_encoder.requires_aesthetics_score:
        index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
        index["requires_aesthetics_score"] = text_encoder.requires_aesthetics_score
    return index


def sdxl_problems(unet: UNet, text_encoder: Any) -> list[str]:
    """What keeps an SDXL U-Net and text encoder from working together (empty: they fit): an SDXL U-Net needs SDXL's
    two encoders and vice versa, and the pooled width plus the time ids' features must be the U-Net's
    projection_class_embeddings_input_dim."""
    cfg, sdxl_text = unet.config, isinstance(text_encoder, SDXLTextEncoder)
    if cfg.addition_embed_type != "text_time":
        return ["SDXL's text encoders need a U-Net with addition_embed_type 'text_time'"] if sdxl_text else []
    if not sdxl_text:
        return ["the U-Net has addition_embed_type 'text_time' (SDXL) but the text encoder gives no pooled embedding "
                "(SDXL needs ldm.networks.text_sdxl.SDXLTextEncoder)"]
    assert cfg.addition_time_embed_dim is not None
    ids = NUM_TIME_IDS - 1 if text_encoder.requires_aesthetics_score else NUM_TIME_IDS  # refiner: no target size
    expected = text_encoder.pooled_size + ids * cfg.addition_time_embed_dim
    if expected != cfg.projection_class_embeddings_input_dim:
        flag = f" (requires_aesthetics_score {str(text_encoder.requires_aesthetics_score).lower()})"
        return [f"the pooled text embedding ({text_encoder.pooled_size}, text_encoder_2's projection_dim) and "
                f"{ids} time ids{flag} x {cfg.addition_time_embed_dim} features make {expected}, but the U-Net's "
                f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}"]
    return []
