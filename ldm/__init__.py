"""Latent diffusion, one room per concern; each imports only those listed above it (autoencoder/, beside this package,
sits between networks/ and loading/; tests/test_imports.py checks it):

- io, random, config, lazy: plumbing every part uses (safetensors I/O and atomic writes, seeded noise, YAML <->
  dataclasses, lazy package exports)
- diffusion/: the math in sigma space: schedules, parameterizations, forward process / posterior / ELBO, losses,
  denoiser wrappers and guidance, samplers, score SDEs, likelihoods, analytic toy data
- networks/: layers, the cross-attention U-Net, the CLIP tokenizer and text encoders
- loading/: a model's parts (U-Net, VAE, text encoder, schedule) and reading / writing them: diffusers folders,
  CompVis single files, the hub
- training/: the U-Net, VAE and CLIP training applications and what they share (config, data, loop, checkpoints, EMA,
  launch), and export of a run
- shapes/: the synthetic captioned-shapes world and the bundled default model's recipe

The KL-VAE lives beside this package in `autoencoder/`; what a user calls (Pipeline, loading, the CLI) in `pipelines/`.
This file imports nothing, so that importing one part never loads the others.
"""

__all__ = ["config", "diffusion", "lazy", "loading", "networks", "shapes", "training"]  # io, random: import them by
# their full names (ldm.io, ldm.random), so that `from ldm import *` does not shadow the standard library's io and random
