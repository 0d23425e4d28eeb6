"""What a user calls: `Pipeline` (text-to-image and img2img), loading any model folder or single-file checkpoint
(loading, folder, single_file with the CompVis key maps of convert), saving both ways, and the `ldm` command line
(cli), and `export`, a training run -> a pipeline folder (ldm.training.export, `ldm export`)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "text_to_image": (
        "PipelineOutput", "Pipeline"
    ),
    "loading": (
        "DEFAULT_MODEL", "ModelNotFoundError", "load_components"
    ),
    "folder": (
        "Components", "IncompatibleComponentsError", "is_pipeline_folder", "load_pipeline_components", "save_pipeline"
    ),
    "single_file": (
        "load_single_file", "save_single_file"
    ),
    "ldm.training.export": (
        "export",
    ),
})
