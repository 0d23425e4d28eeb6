"""The KL-regularized autoencoder (Rombach et al. 2022): encoder, decoder and sliced / tiled decoding (model, tiling),
the diagonal Gaussian posterior (distribution), the reconstruction + KL + optional PatchGAN loss (losses) and latent
standardization (latent_norm). Built from ldm.networks' blocks; trained by ldm.training.vae."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "model": (
        "VAEConfig", "Encoder", "Decoder", "AutoencoderKL"
    ),
    "distribution": (
        "gaussian_kl_standard", "gaussian_kl", "gaussian_nll", "DiagonalGaussian"
    ),
    "losses": (
        "VAELossConfig", "reconstruction_loss", "hinge_d_loss", "hinge_g_loss", "adaptive_weight", "warmup_factor",
        "PatchDiscriminator", "VAELoss"
    ),
    "tiling": (
        "blend_tiles", "tiled_apply"
    ),
    "latent_norm": (
        "latent_channel_stats", "fold_latent_standardization"
    ),
})
