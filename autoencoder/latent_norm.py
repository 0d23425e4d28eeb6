"""Per-channel latent standardisation folded into the VAE's 1 x 1 convolutions, so diffusers loads it unchanged.

Latent diffusion scales the latents by one number, 1 / std (Rombach et al. 2022, sec. 4.3.2). When the channels'
spreads differ (a small 4-channel VAE: stds 0.4 to 1.3 after that scaling), the same noise level destroys the
low-variance channels' content several times earlier than the others'. SDXL-era VAE configs carry per-channel
`latents_mean` / `latents_std` for this, but diffusers' StableDiffusionPipeline ignores them; instead the affine
map z' = (z - mu) / sigma is folded into `quant_conv` (the posterior's mean and log-variance) and its inverse into
`post_quant_conv`, so decode(encode(x)) is unchanged, the latents have zero mean and unit variance per channel,
scaling_factor becomes 1 and the folder stays a plain AutoencoderKL.
"""

from __future__ import annotations

import torch

from autoencoder.model import AutoencoderKL


@torch.no_grad()
def latent_channel_stats(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of z ~ q(z | x) over `images` (N, C, H, W) in [-1, 1], before any scaling."""
    z = torch.cat([vae.encode(x).sample(generator) for x in images.split(batch)])
    return z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))


@torch.no_grad()
def fold_latent_standardization(vae: AutoencoderKL, mean: torch.Tensor, std: torch.Tensor) -> AutoencoderKL:
    """Make encode() give (z - mean) / std and decode() take it, in place; scaling_factor 1, shift_factor None."""
    c = vae.config.latent_channels
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("fold_latent_standardization needs use_quant_conv and use_post_quant_conv (the 1 x 1 "
                         "convolutions the affine map is folded into)")
    if mean.shape != (c,) or std.shape != (c,):
        raise ValueError(f"mean and std must have shape ({c},) (latent_channels), got {tuple(mean.shape)} and "
                         f"{tuple(std.shape)}")
    if not bool((std > 0).all()):
        raise ValueError(f"std must be positive per channel, got {std.tolist()}")
    mean, std = mean.to(vae.quant_conv.weight), std.to(vae.quant_conv.weight)
    q = vae.quant_conv  # moments (mean_z, logvar_z) = W h + b; z' = (z - mean) / std: var' = var / std^2
    q.weight[:c] /= std.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - mean) / std
    q.bias[c:] -= 2.0 * torch.log(std)
    p = vae.post_quant_conv  # p(z) = p(std z' + mean) = (W diag(std)) z' + (W mean + b)
    p.bias += (p.weight[:, :, 0, 0] @ mean)
    p.weight *= std.view(1, c, 1, 1)
    vae.config.scaling_factor = 1.0
    vae.config.shift_factor = None
    return vae
