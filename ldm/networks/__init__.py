"""The networks, in diffusers' state-dict names: building blocks (layers), the cross-attention U-Net (unet; its config: unet_config) and its
DeepCache feature cache (feature_cache), the CLIP tokenizer (tokenizer), CLIP's text transformer in transformers' names
(clip_text), CLIP / OpenCLIP text encoders (text) and OpenCLIP <-> transformers weight maps (text_openclip)."""

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
    "tokenizer": (
        "MAX_LENGTH", "TOKENIZER_FILES", "CLIPTokenizer", "build_clip_tokenizer", "save_tokenizer", "load_tokenizer"
    ),
    "clip_text": (
        "CLIPTextConfig", "CLIPTextModel", "CLIPTextModelWithProjection"
    ),
    "text": (
        "clip_skip_of", "PromptEncoder", "hub_state_dict", "load_hub_state_dict", "assign_hub_state_dict",
        "checked_hub_keys", "meta_text_model", "check_tokenizer_fits",
        "TextEncoder", "OpenCLIPTextEncoder"
    ),
    "text_openclip": (
        "ConversionError", "text_tower_state_dict", "openclip_text_fields", "openclip_text_config",
        "openclip_to_transformers", "transformers_to_openclip"
    ),
})
