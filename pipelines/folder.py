"""Pipeline folders (diffusers' Stable Diffusion layout) with our AutoencoderKL bound in; see ldm/components.py."""

from __future__ import annotations

from pathlib import Path

import torch

from autoencoder.model import AutoencoderKL
from ldm.components import (  # noqa: F401 - the public names of pipeline folders
    DEFAULT_SCHEDULER_CLASS,
    Components,
    IncompatibleComponentsError,
    check_components,
    is_pipeline_folder,
    load_pipeline_folder,
    load_schedule,
    model_index,
    save_pipeline,
    save_schedule,
)


def load_pipeline_components(
    folder: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> Components:
    """Load a diffusers-format pipeline folder (ours or diffusers') into our modules, with errors naming the part."""
    return load_pipeline_folder(folder, vae_class=AutoencoderKL, allow_pickle=allow_pickle, dtype=dtype)
