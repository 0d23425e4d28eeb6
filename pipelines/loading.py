"""The bundled default model: where it ships in the package, and loading it (docs/default-model.md)."""

from __future__ import annotations


from ldm.loading.components import Components, load_pipeline_folder
from ldm.loading.sources import BUNDLED_MODEL, ModelNotFoundError

DEFAULT_MODEL = BUNDLED_MODEL  # pipelines/default_model: "default" as a model path names it too


def load_default_model() -> Components:
    """The bundled default model's components, or ModelNotFoundError saying how to get them back."""
    if not (DEFAULT_MODEL / "model_index.json").is_file():
        raise ModelNotFoundError(f"the bundled default model is missing from {DEFAULT_MODEL}; reinstall the package, "
                                 "or pass a model folder or checkpoint to Pipeline.from_pretrained")
    return load_pipeline_folder(DEFAULT_MODEL)
