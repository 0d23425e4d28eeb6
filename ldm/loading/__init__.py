"""A model's parts and reading / writing them: the Components bundle and the diffusers folder layout (components),
single-file checkpoints in the CompVis layout (single_file) through key maps (convert), SDXL's folders (sdxl) and
SGM-layout single files (sdxl_single_file), a super-resolution stage's upscaler folders (upscaler), and one entry point for any
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
    "sdxl": (
        "sdxl_subfolders", "load_sdxl_text_encoder", "sdxl_model_index", "sdxl_problems"
    ),
    "sdxl_single_file": (
        "sgm_unet_pairs", "split_sgm", "load_sdxl_single_file", "sgm_state_and_configs"
    ),
    "sources": (
        "DEFAULT_MODEL", "ModelNotFoundError", "load_components"
    ),
    "upscaler": (
        "UpscalerComponents", "check_upscaler_components", "upscaler_vae", "is_upscaler_folder", "save_upscaler",
        "load_upscaler"
    ),
})
