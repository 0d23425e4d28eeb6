"""Latent diffusion, one room per concern (imports flow down this list; tests/test_imports.py checks it):

- io, random, config, lazy: plumbing every part uses (safetensors I/O and atomic writes, seeded noise, YAML <->
  dataclasses, lazy package exports)
- diffusion/: the math in sigma space: schedules, parameterizations, forward process / posterior / ELBO, losses,
  denoiser wrappers and guidance, samplers, score SDEs, likelihoods, analytic toy data
- networks/: layers, the cross-attention U-Net, the CLIP tokenizer and text encoders
- components: a model's parts (U-Net, VAE, text encoder, schedule) and their diffusers folder
- training/: the U-Net, VAE and CLIP training applications and what they share (config, data, loop, checkpoints, EMA,
  launch), and export of a run
- shapes/: the synthetic captioned-shapes world and the bundled default model's recipe

The KL-VAE lives beside this package in `autoencoder/`; what a user calls (Pipeline, loading, the CLI) in `pipelines/`.
This file imports nothing, so that importing one part never loads the others.
"""

__all__ = ["components", "config", "diffusion", "io", "lazy", "networks", "random", "shapes", "training"]
