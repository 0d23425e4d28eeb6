"""What a user calls: `Pipeline` (text-to-image and img2img), `Upscaler` and `Cascade` (super-resolution), the `ldm` command
line (cli), and, re-exported from the layers below, loading and saving any model folder or single-file checkpoint
(ldm.loading) and `export`, a training run -> a pipeline folder (ldm.training.export, `ldm export`)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "text_to_image": ("PipelineOutput", "Pipeline"),
    "upscaler": ("Upscaler",),
    "cascade": ("Cascade",),
    "ldm.loading.sources": ("DEFAULT_MODEL", "ModelNotFoundError", "load_components"),
    "ldm.loading.components": (
        "Components", "IncompatibleComponentsError", "is_pipeline_folder", "load_pipeline_folder", "save_pipeline"
    ),
    "ldm.loading.single_file": ("load_single_file", "save_single_file"),
    "ldm.training.export": ("export",),
})
