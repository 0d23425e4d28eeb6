"""The networks, in diffusers' state-dict names: building blocks (layers), the cross-attention U-Net (unet; its config: unet_config) and its
DeepCache feature cache (feature_cache), the noisy classifier of classifier guidance (classifier) and the noise-aware CLIP of CLIP guidance (noisy_clip), on one
trunk (noisy_trunk), the CLIP tokenizer (tokenizer), CLIP's text transformer in transformers' names
(clip_text), prompts -> weighted token windows (prompt_syntax) and what every text encoder shares (prompt_encoder),
CLIP / OpenCLIP text encoders (text), SDXL's pair of them (text_sdxl) and its added U-Net conditioning
(added_conditioning), and OpenCLIP <-> transformers weight maps (text_openclip)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "layers": (
        "timestep_embedding", "Timesteps", "TimestepEmbedding", "ResnetBlock2D", "Downsample2D", "Upsample2D",
        "attention", "Attention", "GEGLU", "FeedForward", "BasicTransformerBlock", "Transformer2DModel"
    ),
    "unet_config": (
        "DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "UNetConfig"
    ),
    "unet": (
        "UNet",
    ),
    "feature_cache": (
        "FeatureCache",
    ),
    "noisy_trunk": (
        "NoisyTrunk", "check_trunk_config", "save_folder", "load_folder"
    ),
    "classifier": (
        "ClassifierConfig", "NoisyClassifier"
    ),
    "noisy_clip": (
        "NoisyCLIPConfig", "NoisyCLIP", "pooled_text", "pooled_text_dim"
    ),
    "tokenizer": (
        "MAX_LENGTH", "TOKENIZER_FILES", "CLIPTokenizer", "build_clip_tokenizer", "save_tokenizer", "load_tokenizer"
    ),
    "clip_text": (
        "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection"
    ),
    "prompt_syntax": (
        "SYNTAXES", "parse_prompt_attention", "prompt_runs", "split_windows", "prompt_windows", "emphasize"
    ),
    "prompt_encoder": (
        "MAX_WINDOWS", "clip_skip_of", "PromptEncoder"
    ),
    "text": (
        "hub_state_dict", "load_hub_state_dict", "assign_hub_state_dict",
        "checked_hub_keys", "meta_text_model", "check_tokenizer_fits",
        "TextEncoder", "OpenCLIPTextEncoder"
    ),
    "added_conditioning": (
        "ADDITION_EMBED_TYPES", "NUM_TIME_IDS", "check_text_time_config", "text_time_modules", "text_time_embedding"
    ),
    "text_sdxl": (
        "SDXLPromptEncoder", "SDXLTextEncoder"
    ),
    "text_openclip": (
        "ConversionError", "text_tower_state_dict", "openclip_text_fields", "openclip_text_config",
        "openclip_to_transformers", "transformers_to_openclip"
    ),
})
