"""The networks, in diffusers' state-dict names: building blocks (layers), the cross-attention U-Net (unet), the CLIP
tokenizer (tokenizer), CLIP / OpenCLIP text encoders (text) and OpenCLIP <-> transformers weight maps (text_openclip)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "layers": (
        "timestep_embedding", "Timesteps", "TimestepEmbedding", "ResnetBlock2D", "Downsample2D", "Upsample2D",
        "attention", "Attention", "GEGLU", "FeedForward", "BasicTransformerBlock", "Transformer2DModel"
    ),
    "unet": (
        "DOWN_BLOCK_TYPES", "UP_BLOCK_TYPES", "UNetConfig", "UNet"
    ),
    "tokenizer": (
        "MAX_LENGTH", "TOKENIZER_FILES", "build_clip_tokenizer", "save_tokenizer", "load_tokenizer"
    ),
    "text": (
        "clip_skip_of", "PromptEncoder", "hub_state_dict", "load_hub_state_dict", "TextEncoder",
        "OpenCLIPTextEncoder"
    ),
    "text_openclip": (
        "ConversionError", "text_tower_state_dict", "openclip_text_config", "openclip_to_transformers",
        "transformers_to_openclip"
    ),
})
