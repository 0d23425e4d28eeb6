"""The bundled model's recipe (ldm.shapes.recipe): config placement and seeds, each optional stage, the latent
checks of the init stage, and the whole recipe end to end at tiny sizes with resume, beside processes and two
U-Net processes."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from ldm.networks.text_openclip import transformers_to_openclip
from ldm.shapes.recipe import DEFAULT_CONFIG, load_recipe, run_recipe, stage_unet
from ldm.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_weights_only,
)
from ldm.training.clip import load_clip

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
    from ldm.shapes.dataset import export_imagefolder
    from ldm.shapes.recipe import stage_data

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
    from ldm.loading.components import load_pipeline_folder

    out = tmp_path / "run"
    cfg = load_recipe(DEFAULT_CONFIG, out, TINY_RUN)
    report = run_recipe(cfg, out, export_to=tmp_path / "model")
    assert all((out / f"{s}.done").is_file() for s in report)
    # the U-Net ran to unet.run.max_steps, then on to unet_extend_to; resuming a finished run trains nothing
    assert report["unet"]["step"] == 3 and [s for s, _ in list_checkpoints(out / "unet" / "checkpoints")] == [2, 3]
    assert stage_unet(cfg, out)["step"] == 3
    assert [s for s, _ in list_checkpoints(out / "unet" / "checkpoints")] == [2, 3]
    c = load_pipeline_folder(tmp_path / "model")
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
    exported = load_pipeline_folder(out / "unet-export").unet.state_dict()
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
    assert all(torch.equal(v, start[k]) for k, v in load_pipeline_folder(out / "pipeline").vae.state_dict().items())
    # switching the layout stage off ships the unet run's EMA U-Net
    off = run_recipe(load_recipe(DEFAULT_CONFIG, out, [*TINY_RUN, "unet_layout.enabled=false"]), out, resume=True)
    assert off["layout"]["skipped"] and (out / "layout.done").read_text() == "skipped"
    shipped_unet = load_pipeline_folder(out / "pipeline").unet.state_dict()
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
    from ldm.shapes.recipe import UNBALANCED_LATENTS, calibration_images, stage_init

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
    with caplog.at_level("WARNING", logger="ldm.shapes.recipe"):
        report = stage_init(cfg, out)
    scaled = report["latent_channel_std_scaled"]
    assert max(scaled) > UNBALANCED_LATENTS * min(scaled) and "latent channels are unbalanced" in caplog.text


def test_recipe_per_channel_latent_norm_folds_into_the_init_vae(tmp_path):
    """latent_norm=per_channel: init/vae is vae-export/ with each latent channel standardised on the calibration
    images (zero mean, unit std), scaling_factor 1, and the same reconstructions; an unknown mode is refused."""
    from autoencoder.latent_norm import latent_channel_stats
    from autoencoder.model import AutoencoderKL
    from ldm.shapes.recipe import calibration_images

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
    from ldm.loading.components import load_schedule
    from ldm.diffusion.schedule import sd_schedule, shift_snr

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
    """num_processes=2: the U-Net stage runs in two local processes (ldm.training.launch), the global batch split between them;
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
