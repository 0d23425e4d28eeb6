"""LoRA: low-rank weight updates as data and files (weights: the diffusers/peft layout; kohya: the kohya/A1111
layout) and into a model as peft layers (layers)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "base": ("LoraModule", "LoraWeights"),
    "weights": ("lora_weights_of", "save_lora_file", "read_lora_file"),
    "kohya": ("kohya_name",),
    "layers": ("inject", "activate", "merge", "unmerge", "remove", "lora_layers"),
})
