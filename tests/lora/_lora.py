"""What the LoRA tests share: tiny SD 1.x / 2.x folders, random LoRAs on their layers, and the same model with the
updates merged by hand (W + scale * (alpha / r) * up @ down), the reference the loaded LoRA must reproduce."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from ldm.loading.components import save_pipeline
from ldm.lora.weights import LoraModule, LoraWeights
from pipelines.text_to_image import Pipeline
from pipelines.tiny import tiny_components

PROMPTS = ["a red circle above a blue square", "two green stars"]

# a Linear of each kind, a 3x3 convolution (LoCon), a 1x1 convolution (SD 1.x proj_in; SD 2.x: Linear), a resnet's
# shortcut and the time embedding, on the U-Net; attention and MLP layers on the text encoder
UNET_MODULES = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj", "down_blocks.0.attentions.1.proj_in",
    "up_blocks.1.attentions.1.proj_out", "down_blocks.0.resnets.0.conv1", "up_blocks.0.resnets.1.conv2",
    "down_blocks.1.resnets.0.conv_shortcut", "mid_block.resnets.1.time_emb_proj", "time_embedding.linear_1",
    "conv_in", "down_blocks.0.downsamplers.0.conv",
]  # fmt: skip
TEXT_MODULES = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.1.mlp.fc1"]


def tiny_folder(path, *, sd2: bool = False):
    """The tiny random model as a diffusers folder; sd2: linear proj_in / proj_out, as SD 2.x."""
    c = tiny_components(seed=0)
    unet = c.unet
    if sd2:
        from ldm.networks.unet import UNet

        torch.manual_seed(0)
        unet = UNet(dataclasses.replace(unet.config, use_linear_projection=True)).eval()
    save_pipeline(path, unet=unet, vae=c.vae, text_encoder=c.text_encoder, schedule=c.schedule)
    return path


def ours(folder) -> Pipeline:
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def random_lora(pipe: Pipeline, *, seed: int = 0, rank: int = 2, text: bool = True, unet_modules=None,
                ranks_vary: bool = True, alphas_vary: bool = True) -> LoraWeights:
    """Random LoRA modules (ranks and alphas varying by module) big enough to change the image; alphas_vary=False:
    alpha 3 everywhere (the scale alpha / r still varies with the rank)."""
    g = torch.Generator().manual_seed(seed)
    out: LoraWeights = {}
    targets = [("unet", pipe.unet, m) for m in (unet_modules or UNET_MODULES)]
    targets += [("text_encoder", pipe.text_encoder.model, m) for m in (TEXT_MODULES if text else [])]
    for i, (prefix, model, path) in enumerate(targets):
        w = model.get_submodule(path).weight
        r = rank + (i % 2 if ranks_vary else 0)
        down = torch.randn(r, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.5
        alpha = float(r) * (1.5 if i % 3 == 0 else 1.0) if alphas_vary else 3.0
        out[f"{prefix}.{path}"] = LoraModule(down, up, alpha=alpha)
    return out


def merge_by_hand(pipe: Pipeline, weights: LoraWeights, scale: float = 1.0) -> None:
    """W += scale * (alpha / r) * up @ down, computed here without peft (float32)."""
    models: dict[str, nn.Module] = {"unet": pipe.unet, "text_encoder": pipe.text_encoder.model}
    with torch.no_grad():
        for key, m in weights.items():
            prefix, path = key.split(".", 1)
            w = models[prefix].get_submodule(path).weight
            down, up = m.down.float(), m.up.float()
            delta = up.flatten(1) @ down.flatten(1)  # (out, in * kh * kw)
            w += (scale * m.alpha / m.rank * delta).reshape(w.shape).to(w.dtype)
    pipe.text_encoder.clear_cache()


def image(pipe, **options) -> np.ndarray:
    """(2, 32, 32, 3) images of the test prompts, fixed noise (Euler, 4 steps)."""
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    return pipe(PROMPTS, num_inference_steps=4, sampler="euler", latents=latents, height=32, width=32,
                output_type="np", progress=False, **options).images


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())
