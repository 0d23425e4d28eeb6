"""Every training application and what they share: the config dataclasses (config), captioned datasets (data) and
their checks (data_checks), the resumable loop (loop), atomic checkpoints (checkpoint), EMA (ema), local multi-process
launch (launch), FSDP2 sharding with full-tensor checkpoints (fsdp) and processes beside (beside); LoRA training
(lora); the U-Net application (unet: `ldm train`, `accelerate launch -m ldm.training.unet`) and its step
(diffusion_step), the KL-VAE (vae), the contrastive CLIP (clip), REPA alignment (repa), learned-variance objectives
(variance_objective), a noisy classifier for classifier guidance (classifier) and a noise-aware CLIP for CLIP guidance
(noisy_clip), with what they share (noisy_latents), a cascade's super-resolution stage
(super_resolution), and export of a run as a pipeline folder (export)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "config": (
        "TextModelConfig", "ModelConfig", "TimestepBiasConfig", "AlignConfig", "ObjectiveConfig", "OptimConfig",
        "RunConfig", "TrainConfig", "load_train_config", "build_optimizer", "build_lr_scheduler",
        "build_accelerator"
    ),
    "data": (
        "HubUnavailableError", "DataConfig", "load_records", "open_image", "resize_shorter_side", "crop_box",
        "to_tensor", "sample_generator", "preprocess", "collate", "samples_consumed", "ResumableSampler",
        "CaptionedImages", "StreamingCaptionedImages", "build_dataloader"
    ),
    "data_checks": (
        "DataError", "ColumnError", "check_columns", "caption_text", "file_problem", "load_local", "DataChecks"
    ),
    "ema": (
        "EMAConfig", "ema_decay", "ema_update_", "EMA"
    ),
    "checkpoint": (
        "checkpoint_name", "step_seed", "slot_generators", "rng_state", "set_rng_state", "folder_digest",
        "list_checkpoints", "latest_checkpoint", "resolve_resume", "prune_checkpoints", "save_checkpoint",
        "read_meta", "load_checkpoint", "load_weights_only"
    ),
    "loop": (
        "Part", "StepContext", "MetricsLogger", "LogWindow", "batch_length", "zero_loss", "check_fresh_output",
        "run_loop"
    ),
    "launch": (
        "free_port", "split_batch", "launch_command", "launch_train"
    ),
    "beside": (
        "Beside",
    ),
    "super_resolution": (
        "SuperResolutionConfig", "LowResConditioning", "upscaler_parts", "downsample", "export_upscaler"
    ),
    "variance_objective": (
        "check_objective", "objective_schedule", "VarianceObjective"
    ),
    "noisy_latents": (
        "folder_images", "pipeline_vae_schedule", "encode", "noisy_batch"
    ),
    "classifier": (
        "ClassifierTrainConfig", "metadata_value", "labelled_images", "train_classifier"
    ),
    "noisy_clip": (
        "NoisyCLIPTrainConfig", "contrastive_logits", "clip_loss", "retrieval_accuracy", "train_noisy_clip"
    ),
    "repa": (
        "Projector", "alignment_loss", "block_output", "captured", "PatchFeatures", "Aligner", "output_channels"
    ),
    "clip": (
        "default_clip_model", "ClipTrainConfig", "build_clip", "context_length", "text_heads", "negclip_loss",
        "ContrastiveStep", "clamp_logit_scale", "train_clip", "save_clip", "export_clip", "load_clip",
        "clip_text_encoder"
    ),
    "vae": (
        "VAEModelConfig", "VAETrainConfig", "psnr", "check_same_trainable", "build_vae", "Reconstruct", "VAEStep",
        "evaluate_psnr", "train_vae", "export_vae"
    ),
    "diffusion_step": (
        "timestep_weights", "dropout_mask", "DiffusionStep"
    ),
    "unet": (
        "load_vae", "build_components", "save_frozen", "render_grid", "text_part", "align_part", "check_fresh_run", "check_frozen", "train"
    ),
    "export": (
        "find_checkpoint", "check_same_latents", "export_lora"
    ),
    "lora": (
        "LoraConfig", "matched_modules", "add_lora", "lora_modules", "lora_unet", "lora_text"
    ),
    "fsdp": (
        "fsdp_requested", "fsdp_plugin", "use_fsdp_on_cpu", "is_sharded", "full", "shard_like", "shard_ema",
        "FullModule", "FullOptimizer", "FullEMA", "Snapshot", "checkpoint_targets", "checkpoint_state", "reshard"
    ),
})
