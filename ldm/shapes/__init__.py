"""The synthetic captioned-shapes world the bundled model is trained and scored on: scenes and their rendering
(scenes), captions and the caption parser (captions), hard-negative captions (negatives), the analytic attribute
detector (detect), imagefolder export (dataset), the bundled model's recipe (recipe_config: the stages as data;
recipe: `python -m ldm.shapes.recipe`) and its learned-variance fine-tune (learned_variance:
`python -m ldm.shapes.learned_variance`)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "scenes": (
        "SHAPES", "PLURALS", "COLORS", "BACKGROUNDS", "SIZES", "POSITIONS", "POSITION_PHRASES", "RELATIONS",
        "RELATION_PHRASES", "HELD_OUT_PAIRS", "SPLITS", "LAYOUTS", "POSITION_STATED", "RELATION_STATED",
        "polygon_area_centroid", "ShapeSpec", "Scene", "PromptObject", "Prompt", "position_of", "relation_of",
        "render", "render_mask", "is_held_out", "check_layouts", "check_relation_stated", "sample_scene"
    ),
    "captions": (
        "group_text", "prompt_caption", "caption", "parse_caption", "scene_prompt"
    ),
    "negatives": (
        "NEGATIVE_KINDS", "applicable_kinds", "negative_prompt", "hard_negative"
    ),
    "detect": (
        "Detection", "connected_components", "estimate_background", "classify_color", "check",
        "score_image", "OPPOSITE", "relation_outcome"
    ),
    "dataset": (
        "dataset_item", "export_imagefolder"
    ),
    "recipe_config": (
        "STAGES", "DataStageConfig", "LayoutTuneConfig", "DefaultModelConfig", "load_recipe"
    ),
    "recipe": (
        "stage_data", "stage_clip", "stage_vae", "stage_init", "calibration_images", "latent_scaling_factor",
        "stage_unet", "train_unet", "stage_layout", "stage_decoder", "stage_export", "parameter_counts",
        "folder_bytes", "run_recipe"
    ),
    "learned_variance": (
        "widen_variance_head", "drop_variance_head", "copy_extra_parts", "write_init_folder"
    ),
})
