"""A tiny random-weight SDXL pipeline folder written by diffusers' StableDiffusionXLPipeline.save_pretrained: SDXL's
block structure at reduced width (tests/networks/test_unet_sdxl.py), a CLIP-L-like first encoder (pads with
<|endoftext|>) and a bigG-like CLIPTextModelWithProjection second (pads with "!", legacy eos id 2 as SDXL's config) of
different widths, so a swapped concatenation cannot pass; the SDXL VAE's scaling 0.13025 and SDXL's scheduler config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from autoencoder.model import VAEConfig
from ldm.config import BUNDLED_CONFIGS, load_config
from ldm.networks.tokenizer import EOS, build_clip_tokenizer, save_tokenizer
from ldm.networks.unet import UNetConfig

TEXT_1, TEXT_2, POOLED, TIME_DIM = 32, 48, 24, 8
SDXL_UNET = UNetConfig(
    sample_size=8, block_out_channels=(16, 32, 64), down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",), layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
    cross_attention_dim=TEXT_1 + TEXT_2, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# SDXL base's scheduler_config.json (EulerDiscreteScheduler, leading spacing, steps_offset 1)
SDXL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                  "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
                  "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False}


def _tokenizer(pad: str, tmp: Path) -> CLIPTokenizer:
    save_tokenizer(build_clip_tokenizer(pad), tmp)
    return CLIPTokenizer.from_pretrained(tmp)


def diffusers_sdxl(tmp: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    """diffusers' tiny SDXL pipeline (seeded random weights, fp32)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(SDXL_UNET.to_diffusers())
    vae_cfg = dataclasses.replace(load_config(VAEConfig, BUNDLED_CONFIGS / "vae-tiny.yaml"), scaling_factor=0.13025)
    vae = DAutoencoderKL.from_config(vae_cfg.to_diffusers())
    common = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=TEXT_1, projection_dim=TEXT_1, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu", **common))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=TEXT_2, projection_dim=POOLED, bos_token_id=0,
                                                        eos_token_id=2, pad_token_id=1, hidden_act="gelu", **common))
    return StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
        tokenizer=_tokenizer(EOS, tmp / "tok1"), tokenizer_2=_tokenizer("!", tmp / "tok2"), unet=unet.eval(),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True,
        add_watermarker=False)


def write_sdxl_folder(tmp: Path, seed: int = 0) -> Path:
    """The tiny SDXL pipeline saved by diffusers (safetensors) under tmp / "sdxl"."""
    pipe = diffusers_sdxl(tmp, seed)
    pipe.save_pretrained(tmp / "sdxl")
    return tmp / "sdxl"


# The refiner: the second encoder alone, an aesthetic score in place of the target size (5 time ids)
REFINER_UNET = dataclasses.replace(SDXL_UNET, cross_attention_dim=TEXT_2,
                                   projection_class_embeddings_input_dim=POOLED + 5 * TIME_DIM)


def write_refiner_folder(tmp: Path, seed: int = 0) -> Path:
    """A tiny SDXL refiner saved by diffusers' StableDiffusionXLImg2ImgPipeline (requires_aesthetics_score, no
    text_encoder / tokenizer, force_zeros_for_empty_prompt false as the refiner's model_index.json) under
    tmp / "refiner"."""
    base = diffusers_sdxl(tmp, seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config(REFINER_UNET.to_diffusers()).eval()
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.save_pretrained(tmp / "refiner")
    return tmp / "refiner"
