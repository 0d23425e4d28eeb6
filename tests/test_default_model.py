"""The bundled default model (pipelines/default_model, docs/default-model.md) and its recipe (ldm.default_model,
ldm.clip_train): it loads offline through Pipeline() and in diffusers, follows simple prompts, ships safetensors only
within 50 MB; the CLIP text tower converts exactly; the recipe runs end to end (tiny sizes) and resumes."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from ldm.clip_train import build_clip, clip_text_encoder, load_clip, save_clip
from ldm.checkpoint import latest_checkpoint, list_checkpoints, load_weights_only
from ldm.default_model import DEFAULT_CONFIG, load_recipe, run_recipe, stage_unet
from ldm.shapes_detect import score_image
from ldm.text import OpenCLIPTextEncoder
from ldm.text_openclip import transformers_to_openclip
from pipelines.loading import DEFAULT_MODEL

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
PROMPTS = ["a red circle", "a blue square to the left of a yellow star", ""]
# The settings these tests were measured at: DPM++ 2M, 20 steps, guidance 3 (docs/quality.md: single-object
# all-correct 96% at s = 3 and at the best s = 5).
DEFAULTS = dict(num_inference_steps=20, guidance_scale=3.0, sampler="dpmpp_2m")


# ------------------------------------------------------------------------------------ CLIP text tower conversion


def with_context(config: dict, n: int) -> dict:
    return {**config, "text_cfg": {**config["text_cfg"], "context_length": n}}


@pytest.mark.parametrize("n", [77, 16])
def test_clip_text_tower_converts_exactly_to_a_clip_text_model(n):
    """Per-token states of the open_clip tower (OpenCLIPTextEncoder) == the converted CLIPTextModel's, to 1e-5, at
    CLIP's 77 tokens and at a shorter context (text_cfg.context_length: the tokenizer pads to it)."""
    config = with_context(TINY_CLIP, n)
    clip = build_clip(config, seed=3).eval()
    with torch.no_grad():
        for p in clip.parameters():  # non-trivial LayerNorm gains/biases too
            p.add_(0.02 * torch.randn_like(p))
        ref = OpenCLIPTextEncoder(clip).encode(PROMPTS)
        got = clip_text_encoder(clip, config).encode(PROMPTS)
    assert got.shape == ref.shape == (3, n, 32)
    assert (got - ref).abs().max() < 1e-5


def test_short_context_text_encoder_round_trips_through_a_diffusers_folder(tmp_path):
    """A 16-token text tower saved as text_encoder/ + tokenizer/ reloads (ours and transformers') with 16 positions
    and the same states; the tokenizer pads to 16 and warns naming what a longer prompt loses."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.text import TextEncoder

    config = with_context(TINY_CLIP, 16)
    enc = clip_text_encoder(build_clip(config, seed=5).eval(), config)
    enc.save_pretrained(tmp_path)
    back = TextEncoder.from_pretrained(tmp_path)
    assert back.tokenizer.model_max_length == 16 and back.model.config.max_position_embeddings == 16
    with torch.no_grad():
        assert torch.equal(back.encode(PROMPTS), enc.encode(PROMPTS))
        theirs = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
        ids = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")(
            PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        assert ids.shape == (3, 16)
        assert torch.allclose(theirs(ids).last_hidden_state, enc.model(ids).last_hidden_state, atol=1e-6)
    with pytest.warns(UserWarning, match="CLIP takes 16"):
        enc.tokenize("a red circle above a blue square to the left of a large yellow star on a gray background")


def test_clip_config_checks_context_length():
    from ldm.clip_train import ClipTrainConfig, ContrastiveStep
    from ldm.data import DataConfig

    data = DataConfig(source="imagefolder", path="x")
    with pytest.raises(ValueError, match="context_length must lie in"):
        ClipTrainConfig(data=data, model=with_context(TINY_CLIP, 2))
    with pytest.raises(ValueError, match="context_length must lie in"):
        ClipTrainConfig(data=data, model=with_context(TINY_CLIP, 78))
    step = ContrastiveStep(torch.nn.Identity(), torch.nn.Identity(), torch.device("cpu"), max_length=16)
    ids = step._ids(PROMPTS)
    assert ids.shape == (3, 16) and ids[0, 0] == 49406 and (ids[2, :2] == torch.tensor([49406, 49407])).all()


def test_clip_folder_without_text_tower_round_trips(tmp_path):
    """save_clip(text=False) + the pipeline's text_encoder/ rebuild the same CLIP: equal image and text features."""
    from pipelines.folder import save_pipeline
    from pipelines.tiny import tiny_components

    clip = build_clip(TINY_CLIP, seed=4).eval()
    c = tiny_components(seed=0)
    save_pipeline(tmp_path / "p", unet=c.unet, vae=c.vae, text_encoder=clip_text_encoder(clip, TINY_CLIP),
                  schedule=c.schedule)
    save_clip(clip, TINY_CLIP, tmp_path / "p" / "clip", text=False)
    back = load_clip(tmp_path / "p" / "clip", text_encoder_folder=tmp_path / "p")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ids = torch.randint(1, 49406, (2, 77))
    with torch.no_grad():
        assert torch.equal(back.encode_image(x), clip.encode_image(x))
        assert torch.allclose(back.encode_text(ids), clip.encode_text(ids), atol=1e-6)
    with pytest.raises(KeyError, match="missing CLIP key"):
        load_clip(tmp_path / "p" / "clip")  # the text tower is not in clip/ alone


# ----------------------------------------------------------------------------------------------------- recipe


def test_recipe_refuses_an_extension_that_does_not_rise(tmp_path):
    with pytest.raises(ValueError, match="unet_extend_to"):
        load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["unet.run.max_steps=10", "unet_extend_to=[20, 20]"])
    with pytest.raises(ValueError, match="unet_extend_to"):
        load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["unet.run.max_steps=10", "unet_extend_to=[5]"])


def test_recipe_decoder_stage_is_decoder_only_and_optional(tmp_path):
    cfg = load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["seed=3"])
    assert cfg.vae_decoder is not None and not cfg.vae_decoder.train_encoder
    assert cfg.vae_decoder.model.pretrained == str(tmp_path / "run" / "init" / "vae")
    assert cfg.vae_decoder.run.output_dir == str(tmp_path / "run" / "vae-decoder") and cfg.vae_decoder.run.seed == 3
    with pytest.raises(ValueError, match="train_encoder must be false"):
        load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["vae_decoder.train_encoder=true"])
    assert load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["vae_decoder=null"]).vae_decoder is None


def test_recipe_layout_stage_starts_from_the_unet_export_and_is_optional(tmp_path):
    cfg = load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["seed=5"])
    tune = cfg.unet_layout
    assert tune is not None and tune.unet.model.pretrained == str(tmp_path / "run" / "unet-export")
    assert tune.unet.data.path == str(tmp_path / "run" / "data" / "train-layout")
    assert tune.unet.run.output_dir == str(tmp_path / "run" / "unet-layout") and tune.unet.run.seed == 5
    assert tune.unet.objective.timestep_bias.strategy == "later" and tune.unet.objective.timestep_bias.multiplier == 3
    assert tune.layouts == {"relation": 1.0} and tune.relation_stated == 1.0
    with pytest.raises(ValueError, match="unknown layout"):
        load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["unet_layout.layouts={relations: 1.0}"])
    nulled = load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["unet_layout=null"])
    assert nulled.unet_layout is None and not nulled.runs("layout")
    # enabled=false switches the stage off and keeps its settings
    assert cfg.runs("layout") and cfg.runs("decoder")
    off = load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["seed=5", "unet_layout.enabled=false"])
    assert not off.runs("layout") and off.unet_layout == replace(tune, enabled=False)


def test_recipe_config_places_paths_and_seeds(tmp_path):
    cfg = load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["seed=7", "unet.run.max_steps=11"])
    assert cfg.unet.model.pretrained == str(tmp_path / "run" / "init") and cfg.unet.run.max_steps == 11
    assert cfg.vae.eval_data.path == str(tmp_path / "run" / "data" / "test-held-out")
    assert cfg.clip.run.seed == cfg.vae.run.seed == cfg.unet.run.seed == cfg.clip.init_seed == 7
    assert cfg.unet_model.cross_attention_dim == cfg.clip.model["text_cfg"]["width"]
    assert cfg.vae_model.latent_channels == cfg.unet_model.in_channels == cfg.unet_model.out_channels == 4
    assert cfg.unet_model.sample_size * cfg.vae_model.downsample_factor == cfg.data.size == cfg.vae_model.sample_size
    assert cfg.unet.objective.condition_dropout == 0.1 and cfg.unet.run.cache_latents and cfg.unet.ema.enabled


def test_recipe_data_stage_mixes_the_training_split_only(tmp_path):
    """data.train_layouts reweights data/train's layouts; the test splits keep LAYOUTS (the same bytes as the default
    mix), so the benchmark's splits do not move with the training mix; an unknown layout name is refused."""
    from ldm.default_model import stage_data
    from ldm.shapes_data import export_imagefolder

    sizes = ["data.n_train=30", "data.n_test_held_out=6", "data.n_test_seen=6"]
    cfg = load_recipe(DEFAULT_CONFIG, tmp_path / "run", [*sizes, "data.train_layouts={relation: 1.0}"])
    assert cfg.data.train_layouts == {"relation": 1.0}
    assert stage_data(cfg, tmp_path / "run") == {"train": 30, "test-held-out": 6, "test-seen": 6}
    data = tmp_path / "run" / "data"
    train = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    assert all(len(r["scene"]["objects"]) == 2 for r in train)  # relation scenes only (under LAYOUTS: about 0.4^30)
    export_imagefolder(tmp_path / "seen", 6, "train", cfg.seed + 1)  # the default mix, same seed as test-seen
    assert (data / "test-seen" / "metadata.jsonl").read_bytes() == (tmp_path / "seen" / "metadata.jsonl").read_bytes()
    default = load_recipe(DEFAULT_CONFIG, tmp_path / "run", sizes)
    assert default.data.train_layouts is None
    with pytest.raises(ValueError, match=r"unknown layout\(s\) \['relations'\]"):
        load_recipe(DEFAULT_CONFIG, tmp_path / "run", ["data.train_layouts={relations: 1.0}"])


TINY_RUN = ["data.n_train=24", "data.n_test_held_out=8", "data.n_test_seen=8", "clip.run.max_steps=2",
            "clip.run.batch_size=8", "vae.run.max_steps=2", "vae.run.batch_size=4", "vae.run.validate_every=2",
            "unet.run.max_steps=2", "unet.run.batch_size=4", "unet.run.validate_every=0", "unet_extend_to=[3]",
            "vae_decoder.run.max_steps=2", "vae_decoder.run.batch_size=4", "vae_decoder.run.validate_every=2",
            "unet_layout.enabled=true", "unet_layout.n_train=8", "unet_layout.unet.run.max_steps=2",
            "unet_layout.unet.run.batch_size=4"]


@pytest.mark.slow  # about 25 s on the shared 2-core CPU
def test_recipe_runs_end_to_end_and_resumes(tmp_path):
    """All stages at tiny sizes; the export loads and ships the decoder-tuned VAE on the U-Net's encoder; a second
    run without --resume refuses, with it skips every stage; a stage re-run re-runs the later ones."""
    from autoencoder.model import AutoencoderKL
    from pipelines.folder import load_pipeline_components

    out = tmp_path / "run"
    cfg = load_recipe(DEFAULT_CONFIG, out, TINY_RUN)
    report = run_recipe(cfg, out, export_to=tmp_path / "model")
    assert all((out / f"{s}.done").is_file() for s in report)
    # the U-Net ran to unet.run.max_steps, then on to unet_extend_to; resuming a finished run trains nothing
    assert report["unet"]["step"] == 3 and [s for s, _ in list_checkpoints(out / "unet" / "checkpoints")] == [2, 3]
    assert stage_unet(cfg, out)["step"] == 3
    assert [s for s, _ in list_checkpoints(out / "unet" / "checkpoints")] == [2, 3]
    c = load_pipeline_components(tmp_path / "model")
    assert c.unet.config.sample_size * c.vae.config.downsample_factor == 64
    assert c.vae.config.scaling_factor == report["init"]["vae_scaling_factor"] > 0
    # the decoder stage: the shipped VAE is vae-decoder's EMA export, its encoder bit-identical to init/vae's
    start = AutoencoderKL.from_pretrained(out / "init" / "vae").state_dict()
    tuned = AutoencoderKL.from_pretrained(out / "vae-decoder-export").state_dict()
    shipped_vae = c.vae.state_dict()
    assert report["decoder"]["step"] == 2 and all(torch.equal(shipped_vae[k], tuned[k]) for k in tuned)
    assert all(torch.equal(shipped_vae[k], start[k]) for k in start if k.startswith(("encoder.", "quant_conv.")))
    assert not all(torch.equal(shipped_vae[k], start[k]) for k in start if k.startswith("decoder."))
    # the layout stage: it starts from the unet run's EMA export, and the shipped U-Net is its own EMA at step 2
    assert report["layout"]["step"] == 2 and len(list((out / "data" / "train-layout").glob("*.png"))) == 8
    layout_ema = load_weights_only(latest_checkpoint(out / "unet-layout" / "checkpoints"), "unet", use_ema=True)
    assert all(torch.equal(c.unet.state_dict()[k], v) for k, v in layout_ema.items())
    unet_ema = load_weights_only(latest_checkpoint(out / "unet" / "checkpoints"), "unet", use_ema=True)
    exported = load_pipeline_components(out / "unet-export").unet.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in unet_ema.items())
    assert not all(torch.equal(layout_ema[k], v) for k, v in unet_ema.items())
    # unet.train_text_encoder: text_encoder/ was trained on, so clip/ keeps the CLIP's own text tower and load_clip
    # takes that one, not text_encoder/ (which has moved: its CLIP score would pair towers never trained together)
    assert cfg.unet.train_text_encoder
    shipped = load_clip(tmp_path / "model" / "clip", text_encoder_folder=tmp_path / "model").state_dict()
    trained_clip = load_clip(out / "clip-export").state_dict()
    assert all(torch.equal(shipped[k], trained_clip[k]) for k in trained_clip)
    moved = transformers_to_openclip(dict(c.text_encoder.model.state_dict()), c.text_encoder.model.config)
    assert not all(torch.equal(moved[k], trained_clip[k]) for k in moved)
    with pytest.raises(FileExistsError, match="--resume"):
        run_recipe(cfg, out)
    again = run_recipe(cfg, out, resume=True)
    assert again == json.loads((out / "report.json").read_text()) == report  # nothing re-ran
    (out / "decoder.done").unlink()
    rerun = run_recipe(cfg, out, resume=True)
    assert rerun["unet"] == report["unet"] and rerun["export"]["wall_s"] > report["export"]["wall_s"]
    # switching the decoder stage off re-runs it (skipped) and the export, which then ships init/vae
    off = run_recipe(load_recipe(DEFAULT_CONFIG, out, [*TINY_RUN, "vae_decoder=null"]), out, resume=True)
    assert off["decoder"]["skipped"] and (out / "decoder.done").read_text() == "skipped"
    assert all(torch.equal(v, start[k]) for k, v in load_pipeline_components(out / "pipeline").vae.state_dict().items())
    # switching the layout stage off ships the unet run's EMA U-Net
    off = run_recipe(load_recipe(DEFAULT_CONFIG, out, [*TINY_RUN, "unet_layout.enabled=false"]), out, resume=True)
    assert off["layout"]["skipped"] and (out / "layout.done").read_text() == "skipped"
    shipped_unet = load_pipeline_components(out / "pipeline").unet.state_dict()
    assert all(torch.equal(shipped_unet[k], v) for k, v in unet_ema.items())
    # a stage that runs removes the later markers first, so a stop after it cannot leave a stale export behind
    (out / "unet.done").unlink()
    run_recipe(cfg, out, resume=True, stop_after="unet")
    assert (out / "unet.done").is_file()
    assert not any((out / f"{s}.done").exists() for s in ("layout", "decoder", "export"))
    # a layout run started from another unet-export/ (the unet stage trained since) is refused, not resumed
    (out / "unet-layout.start.sha256").write_text("0" * 64)
    with pytest.raises(RuntimeError, match="started from another unet-export"):
        run_recipe(cfg, out, resume=True)
    # raising the U-Net's horizon resumes the finished unet stage and re-runs the later ones (layout off here: a
    # layout run is tied to the unet-export/ it started from)
    before = json.loads((out / "report.json").read_text())
    longer = run_recipe(load_recipe(DEFAULT_CONFIG, out, [*TINY_RUN, "unet_extend_to=[4]", "unet_layout.enabled=false"]),
                        out, resume=True)
    assert longer["unet"]["step"] == 4 and longer["export"]["wall_s"] > before["export"]["wall_s"]
    assert [s for s, _ in list_checkpoints(out / "unet" / "checkpoints")] == [3, 4]


@pytest.mark.slow  # about 35 s on the shared 2-core CPU
def test_recipe_decoder_beside_the_unet_matches_the_decoder_after_it(tmp_path):
    """decoder_beside_unet: the decoder stage trains in a second process during the U-Net stage, is reported with its
    own wall time, and gives bit for bit the decoder of the stage run after the U-Net (1 thread each)."""
    from autoencoder.model import AutoencoderKL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out, tiny = tmp_path / "run", [*TINY_RUN, "unet_layout.enabled=false"]
        report = run_recipe(load_recipe(DEFAULT_CONFIG, out, [*tiny, "decoder_beside_unet=true"]), out)
        assert report["decoder"]["beside_unet"] and report["decoder"]["step"] == 2 and report["decoder"]["wall_s"] > 0
        assert torch.get_num_threads() == 1 and (out / "export.done").is_file()
        beside = AutoencoderKL.from_pretrained(out / "vae-decoder-export").state_dict()
        shutil.rmtree(out / "vae-decoder")
        (out / "decoder.done").unlink()
        after = run_recipe(load_recipe(DEFAULT_CONFIG, out, tiny), out, resume=True)
        assert "beside_unet" not in after["decoder"] and after["unet"] == report["unet"]
        sequential = AutoencoderKL.from_pretrained(out / "vae-decoder-export").state_dict()
        assert all(torch.equal(beside[k], v) for k, v in sequential.items())
        # a stop after the U-Net waits for the decoder process (its run finished), but leaves the stage's marker to a
        # resume (which re-runs the finished stage: an export, no training)
        out = tmp_path / "stopped"
        run_recipe(load_recipe(DEFAULT_CONFIG, out, [*tiny, "decoder_beside_unet=true"]), out, stop_after="unet")
        assert (out / "unet.done").is_file() and not (out / "decoder.done").exists()
        assert [s for s, _ in list_checkpoints(out / "vae-decoder" / "checkpoints")] == [2]
    finally:
        torch.set_num_threads(threads)


def test_recipe_init_reports_latent_channel_balance(tmp_path, caplog):
    """The init stage reports each latent channel's std before and after the scaling factor (the same samples the
    factor is measured on: their pooled std times it is 1) and warns when the scaled stds are more than
    UNBALANCED_LATENTS apart; rescaling one channel of the VAE's quant_conv by 5 triggers it."""
    from autoencoder.latent_norm import latent_channel_stats
    from autoencoder.model import AutoencoderKL
    from ldm.default_model import UNBALANCED_LATENTS, calibration_images, stage_init

    out = tmp_path / "run"
    cfg = load_recipe(DEFAULT_CONFIG, out, TINY_RUN)
    report = run_recipe(cfg, out, stop_after="init")["init"]
    vae = AutoencoderKL.from_pretrained(out / "vae-export").eval()
    images = calibration_images(out / "data" / "train", 64)
    with torch.no_grad():
        mean, std = latent_channel_stats(vae, images, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(torch.tensor(report["latent_channel_std"]), std)
    assert torch.allclose(torch.tensor(report["latent_channel_mean"]), mean)
    scaled = torch.tensor(report["latent_channel_std_scaled"])
    assert torch.allclose(scaled, std * report["vae_scaling_factor"])
    c = vae.config.latent_channels
    with torch.no_grad():  # z_0 -> 5 z_0 (its mean and its std): its share of the pooled variance dominates
        vae.quant_conv.weight[0] *= 5.0
        vae.quant_conv.bias[0] *= 5.0
        vae.quant_conv.weight[c] *= 0.0
        vae.quant_conv.bias[c] = 2 * math.log(5.0)  # log variance; an untrained tiny VAE's is about 0
    vae.save_pretrained(out / "vae-export")
    with caplog.at_level("WARNING", logger="ldm.default_model"):
        report = stage_init(cfg, out)
    scaled = report["latent_channel_std_scaled"]
    assert max(scaled) > UNBALANCED_LATENTS * min(scaled) and "latent channels are unbalanced" in caplog.text


def test_recipe_per_channel_latent_norm_folds_into_the_init_vae(tmp_path):
    """latent_norm=per_channel: init/vae is vae-export/ with each latent channel standardised on the calibration
    images (zero mean, unit std), scaling_factor 1, and the same reconstructions; an unknown mode is refused."""
    from autoencoder.latent_norm import latent_channel_stats
    from autoencoder.model import AutoencoderKL
    from ldm.default_model import calibration_images

    out = tmp_path / "run"
    scalar = run_recipe(load_recipe(DEFAULT_CONFIG, out, TINY_RUN), out, stop_after="init")
    (out / "init.done").unlink()  # the init stage again, per channel: its report entry is replaced, not merged
    report = run_recipe(load_recipe(DEFAULT_CONFIG, out, [*TINY_RUN, "latent_norm=per_channel"]), out,
                        resume=True, stop_after="init")
    assert "latent_channel_std_scaled" in scalar["init"] and "latent_channel_std_scaled" not in report["init"]
    assert report["init"]["wall_s"] > scalar["init"]["wall_s"] and report["vae"] == scalar["vae"]
    raw, init = (AutoencoderKL.from_pretrained(out / d).eval() for d in ("vae-export", "init/vae"))
    assert init.config.scaling_factor == report["init"]["vae_scaling_factor"] == 1.0
    images = calibration_images(out / "data" / "train", 64)
    assert len(images) == 24
    mean, std = latent_channel_stats(init, images, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(mean, torch.zeros(4), atol=1e-4) and torch.allclose(std, torch.ones(4), atol=1e-4)
    assert torch.allclose(torch.tensor(report["init"]["latent_channel_std"]),
                          latent_channel_stats(raw, images, generator=torch.Generator().manual_seed(0))[1])
    with torch.no_grad():
        assert torch.allclose(init(images[:4]), raw(images[:4]), atol=1e-5)
    with pytest.raises(Exception, match="latent_norm"):
        load_recipe(DEFAULT_CONFIG, out, ["latent_norm=whiten"])


def test_recipe_snr_shift_goes_into_the_init_folders_schedule(tmp_path):
    """snr_shift=2: init/scheduler is SD's schedule with SNR / 4 (as trained_betas), which the U-Net stage trains
    with and diffusers reads; a shift <= 0 is refused."""
    from ldm.components import load_schedule
    from ldm.schedule import sd_schedule, shift_snr

    out = tmp_path / "run"
    run_recipe(load_recipe(DEFAULT_CONFIG, out, [*TINY_RUN, "snr_shift=2.0"]), out, stop_after="init")
    schedule = load_schedule(out / "init" / "scheduler")
    assert schedule == shift_snr(sd_schedule(), 2.0) and schedule.trained_betas is not None
    ab, ab0 = schedule.alphas_cumprod().double(), sd_schedule().alphas_cumprod().double()
    torch.testing.assert_close(ab / (1 - ab), ab0 / (1 - ab0) / 4, rtol=5e-4, atol=0)
    with pytest.raises(Exception, match="snr_shift"):
        load_recipe(DEFAULT_CONFIG, out, ["snr_shift=0"])


@pytest.mark.slow  # about 40 s: two torch processes start
def test_recipe_unet_stage_in_two_processes_matches_one(tmp_path):
    """num_processes=2: the U-Net stage runs in two local processes (ldm.launch), the global batch split between them;
    the same records, timesteps and noise per global slot as one process, so only float summation order differs:
    the losses agree to 1e-6, and all but 0.01% of the weights to 1e-5 after 2 AdamW steps at lr 1e-3 (AdamW's
    first steps are about lr * sign(gradient), so a gradient that rounds near zero can move its weight by up to one
    step; measured: 87 of 4.1M U-Net weights beyond 1e-5, at most 2.1e-4)."""
    import shutil

    from ldm.io import load_state_dict

    one = tmp_path / "one"
    run_recipe(load_recipe(DEFAULT_CONFIG, one, TINY_RUN), one, stop_after="init")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    steps = ["unet_extend_to=[]", "unet.run.checkpoint_every=2", "unet.optim.warmup_steps=0", "unet.optim.lr=1e-3"]
    assert stage_unet(load_recipe(DEFAULT_CONFIG, one, [*TINY_RUN, *steps]), one)["step"] == 2
    cfg = load_recipe(DEFAULT_CONFIG, two, [*TINY_RUN, *steps, "num_processes=2"])
    assert stage_unet(cfg, two)["step"] == 2
    assert load_recipe(DEFAULT_CONFIG, two, [*TINY_RUN, "num_processes=2"]).unet.run.batch_size == 4  # global
    assert "batch_size: 2" in (two / "unet.launch.yaml").read_text() and (two / "unet.launch.log").is_file()
    name = "checkpoints/step-00000002"
    start = load_state_dict(one / "init" / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_state_dict(two / "unet" / name / "unet.safetensors")
    assert max((trained[k] - v).abs().max().item() for k, v in start.items()) > 1e-3  # AdamW moved them ~lr
    assert '"num_processes": 2' in (two / "unet" / name / "meta.json").read_text()
    losses = [float((d / "unet" / "losses.csv").read_text().splitlines()[-1].split(",")[2]) for d in (one, two)]
    assert abs(losses[0] - losses[1]) < 1e-6, losses
    for part in ("unet.safetensors", "unet.ema.safetensors", "text_encoder.safetensors"):
        a, b = load_state_dict(one / "unet" / name / part), load_state_dict(two / "unet" / name / part)
        assert a.keys() == b.keys()
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        assert (diff > 1e-5).float().mean() < 1e-4 and diff.max() < 1e-3, (part, diff.max())
    with pytest.raises(ValueError, match="batch_size 4 of .*unet does not split evenly between 3 processes"):
        load_recipe(DEFAULT_CONFIG, two, [*TINY_RUN, "num_processes=3"])
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        load_recipe(DEFAULT_CONFIG, two, [*TINY_RUN, "num_processes=0"])


# ---------------------------------------------------------------------------------------- the bundled model


def test_bundled_folder_is_small_and_pickle_free():
    files = [p for p in DEFAULT_MODEL.rglob("*") if p.is_file()]
    assert (DEFAULT_MODEL / "model_index.json").is_file() and (DEFAULT_MODEL / "clip" / "open_clip_config.json").is_file()
    total = sum(p.stat().st_size for p in files)
    assert total <= 50 * 2**20, f"{total / 2**20:.1f} MiB"
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")]
    assert {p.suffix for p in files} <= {".json", ".txt", ".safetensors"}  # pyproject package-data ships all of them


@pytest.fixture(scope="module")
def pipe():
    from pipelines.text_to_image import Pipeline

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return Pipeline()  # the bundled default model, offline


def test_default_pipeline_follows_a_simple_prompt(pipe):
    """"a red circle" at the test settings, seeds 0-4: the detected object is red, a circle, and all-correct (also
    exactly one object) in >= 4 of 5 images each (measured 5/5, 5/5, 4/5; chance is 1/8 and 1/6 for colour and
    shape)."""
    images = pipe(["a red circle"] * 5, seed=list(range(5)), output_type="np", progress=False, **DEFAULTS).images
    assert images.shape == (5, 64, 64, 3)
    scores = [score_image("a red circle", im) for im in images]
    assert sum(s["color"] for s in scores) >= 4, scores
    assert sum(s["shape"] for s in scores) >= 4, scores
    assert sum(s["all"] for s in scores) >= 4, scores


def test_default_pipeline_puts_objects_where_the_prompt_says(pipe):
    """Three positions, seeds 0-4 each: the object's detected position is the prompt's in >= 12 of 15 images
    (measured 15/15; a model that ignores position words scores about 1 in 5, as the previous model did)."""
    prompts = ["a blue square on the left", "a yellow star at the top", "a green circle at the bottom"]
    hits = []
    for prompt in prompts:
        images = pipe([prompt] * 5, seed=list(range(5)), output_type="np", progress=False, **DEFAULTS).images
        hits += [bool(score_image(prompt, im)["position"]) for im in images]
    assert sum(hits) >= 12, hits


def test_default_pipeline_draws_the_readmes_two_object_prompt(pipe):
    """The README's first prompt, seeds 0-9: both shapes and both colours right in >= 8 of 10 and all attributes
    (with the relation "above") in >= 4 of 10 (measured 10/10, 10/10 and 6/10; guessing the shapes alone would get
    both right about 1 in 36)."""
    prompt = "a red circle above a blue square"
    images = pipe([prompt] * 10, seed=list(range(10)), output_type="np", progress=False, **DEFAULTS).images
    scores = [score_image(prompt, im) for im in images]
    assert sum(s["shape"] for s in scores) >= 8, scores
    assert sum(s["color"] for s in scores) >= 8, scores
    assert sum(s["all"] for s in scores) >= 4, scores


def test_default_pipeline_follows_colours(pipe):
    """Five other colours and shapes, one seed each: the colour is right in >= 4 of 5 and all attributes in >= 4 of 5
    (measured 5/5 and 5/5; a model that ignored the prompt would get colour right about 1 in 8)."""
    prompts = ["a blue square", "a yellow star", "a green triangle", "a white circle", "an orange diamond"]
    images = pipe(prompts, seed=10, output_type="np", progress=False, **DEFAULTS).images
    scores = [score_image(p, im) for p, im in zip(prompts, images)]
    assert sum(s["color"] for s in scores) >= 4, list(zip(prompts, scores))
    assert sum(s["all"] for s in scores) >= 4, list(zip(prompts, scores))


def test_default_model_loads_in_diffusers_and_matches(pipe):
    """diffusers' StableDiffusionPipeline reads the folder; with the same noise and Euler (10 steps) it gives our image:
    max abs pixel difference <= 1/255 at s = 1 and s = 3 (measured 3e-8 mean; diffusers' own fp32 vs fp64 differ by
    as much). The folder's scheduler must say steps_offset = 1: diffusers' pipeline rewrites any other value to 1,
    which shifts every timestep by one (that alone gave a 0.043 max difference)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    theirs = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    n = pipe.unet.config.sample_size
    latents = torch.randn(1, pipe.unet.config.in_channels, n, n, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 3.0):
        kw = dict(num_inference_steps=10, guidance_scale=scale, latents=latents, output_type="np")
        ref = theirs("a red circle", height=64, width=64, **kw).images
        got = pipe("a red circle", sampler="euler", progress=False, **kw).images
        assert ref.shape == got.shape == (1, 64, 64, 3)
        diff = np.abs(ref - got)
        assert diff.max() <= 1 / 255, (scale, diff.mean(), diff.max())
    assert score_image("a red circle", ref[0])["color"]  # diffusers' image has the red object too


def test_bundled_clip_matches_images_to_their_captions(pipe):
    """The small CLIP retrieves the right caption among 32 test images far above chance (1/32): top-1 >= 25%."""
    from ldm.shapes_data import dataset_item

    clip = load_clip(DEFAULT_MODEL / "clip", text_encoder_folder=DEFAULT_MODEL)
    items = [dataset_item(1, "train", i) for i in range(32)]
    x = torch.from_numpy(np.stack([np.asarray(im) for im, _, _ in items])).float().permute(0, 3, 1, 2) / 127.5 - 1
    ids = clip_text_encoder(clip, json.loads((DEFAULT_MODEL / "clip" / "open_clip_config.json").read_text())).tokenize(
        [c for _, c, _ in items])
    with torch.no_grad():
        sim = clip.encode_image(x, normalize=True) @ clip.encode_text(ids, normalize=True).T  # (32, 32)
    acc = float((sim.argmax(1) == torch.arange(32)).float().mean())
    assert acc >= 0.25, acc
