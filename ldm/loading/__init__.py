"""A model's parts and reading / writing them: the Components bundle and the diffusers folder layout (components),
single-file checkpoints in the CompVis layout (single_file) through key maps (convert), and one entry point for any
source: a folder, a file or a hub name (sources)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "components": (
        "IncompatibleComponentsError", "Components", "check_components", "model_index", "scheduler_class",
        "save_schedule", "load_schedule", "pipeline_schedule", "save_pipeline", "is_pipeline_folder",
        "load_pipeline_folder"
    ),
    "single_file": (
        "checkpoint_family", "SUPPORTED_FAMILIES", "load_single_file", "text_layout", "save_single_file"
    ),
    "convert": (
        "unet_prefix_map", "vae_prefix_map", "rename", "split_single_file", "unet_from_compvis", "unet_to_compvis",
        "vae_from_compvis", "vae_to_compvis", "clip_from_compvis"
    ),
    "sources": (
        "DEFAULT_MODEL", "ModelNotFoundError", "load_components"
    ),
})
