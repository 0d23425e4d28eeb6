"""Decoder-only VAE fine-tuning (ldm.training.vae train_encoder=false) and shipping its VAE beside a trained U-Net
(ldm.training.export vae=..., ldm export --vae), with the check that the replacement encodes exactly as the training VAE.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.training.vae import VAETrainConfig, export_vae, train_vae
from ldm.config import ConfigError
from ldm.io import WeightsError, load_state_dict
from ldm.training.unet import train
from ldm.training.config import load_train_config
from pipelines.cli import main as cli
from ldm.training.export import check_same_latents, export
from ldm.loading.components import load_pipeline_folder
from tests._helpers import ROOT, tiny_config

TINY_VAE = VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                     sample_size=32)


@pytest.fixture(scope="module")
def unet_run(shapes, tmp_path_factory) -> Path:
    """A 2-update U-Net run (its frozen/vae is the VAE the U-Net learned the latents of)."""
    out = tmp_path_factory.mktemp("unet")
    train(tiny_config(shapes, out, "run.max_steps=2"))
    return out


def vae_config(shapes: Path, out: Path, *extra: str) -> VAETrainConfig:
    return load_train_config(VAETrainConfig, ROOT / "ldm/configs/vae-train-tiny.yaml", [
        f"data.path={shapes}", "eval_data=null", f"run.output_dir={out}", "run.max_steps=2", "run.batch_size=2",
        "run.checkpoint_every=2", "run.log_every=1", "run.validate_every=0", "run.progress_bar=false",
        "loss.use_discriminator=false", *extra])


def test_decoder_only_finetuning_keeps_the_encoder_bitwise(shapes, tmp_path):
    """train_encoder=false: 2 updates from an exported VAE leave encoder and quant_conv bit-identical in the raw and
    the EMA weights (so latents a U-Net was trained on are unchanged) while every decoder tensor moves; resuming with
    train_encoder flipped is refused by name."""
    train_vae(vae_config(shapes, tmp_path / "a"))
    start = export_vae(tmp_path / "a", tmp_path / "vae", use_ema=False)
    tuned = vae_config(shapes, tmp_path / "b", "model.config=null", f"model.pretrained={start}", "train_encoder=false")
    train_vae(tuned)
    before = load_state_dict(start / "diffusion_pytorch_model.safetensors")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    moved = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and moved and len(frozen) + len(moved) == len(before)
    for name in ("vae.safetensors", "vae.ema.safetensors"):
        after = {k.removeprefix("vae."): v for k, v in
                 load_state_dict(tmp_path / "b/checkpoints/step-00000002" / name).items()}
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in frozen), name
        assert all(not torch.equal(before[k], after[k]) for k in moved), name
    with pytest.raises(ConfigError, match="train_encoder"):
        train_vae(dataclasses.replace(tuned, train_encoder=True, run=dataclasses.replace(tuned.run, max_steps=3,
                                                                                          resume="latest")))


def _changed(vae: AutoencoderKL, prefix: str, scaling: float | None = None) -> AutoencoderKL:
    """A copy of `vae` with the first parameter under `prefix` moved by 0.5 (and another scaling factor)."""
    other = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scaling or vae.config.scaling_factor))
    other.load_state_dict(vae.state_dict())
    with torch.no_grad():
        next(p for n, p in other.named_parameters() if n.startswith(prefix)).add_(0.5)
    return other


def test_check_same_latents_names_what_differs():
    """Only the decoder may differ: a changed encoder tensor, config field (even one no tensor shape shows, like
    norm_num_groups) or an extra quant_conv in the replacement is refused, naming it."""
    torch.manual_seed(0)
    trained = AutoencoderKL(TINY_VAE)
    check_same_latents(trained, _changed(trained, "decoder."), "vae")  # decoder-only: accepted
    check_same_latents(trained, _changed(trained, "post_quant_conv."), "vae")
    with pytest.raises(WeightsError, match=r"vae: encoder\.conv_in\.weight differs"):
        check_same_latents(trained, _changed(trained, "encoder."), "vae")
    with pytest.raises(WeightsError, match="quant_conv.weight differs"):
        check_same_latents(trained, _changed(trained, "quant_conv."), "vae")
    with pytest.raises(WeightsError, match="scaling_factor is 0.3"):
        check_same_latents(trained, _changed(trained, "decoder.", scaling=0.3), "vae")
    with pytest.raises(WeightsError, match="norm_num_groups is 2"):
        check_same_latents(trained, AutoencoderKL(dataclasses.replace(TINY_VAE, norm_num_groups=2)), "vae")
    plain = AutoencoderKL(dataclasses.replace(TINY_VAE, use_quant_conv=False))
    with pytest.raises(WeightsError, match="use_quant_conv"):
        check_same_latents(plain, trained, "vae")
    # past the config check, the key check is two-way: an extra quant_conv tensor is named as unexpected
    relabelled = AutoencoderKL(TINY_VAE)
    relabelled.config = plain.config
    relabelled.load_state_dict({**plain.state_dict(), **{k: v for k, v in relabelled.state_dict().items()
                                                        if k.startswith("quant_conv.")}}, strict=False)
    with pytest.raises(WeightsError, match=r"quant_conv\.bias is unexpected"):
        check_same_latents(plain, relabelled, "vae")


def test_export_ships_a_decoder_finetuned_vae_and_refuses_another_encoder(unet_run, tmp_path, capsys):
    """export(vae=...) writes the given VAE when only its decoder differs; another encoder is refused and nothing is
    written; the same through `ldm export --vae` (exit 2, one line naming the folder and the key)."""
    trained = AutoencoderKL.from_pretrained(unet_run / "frozen/vae")
    tuned = _changed(trained, "decoder.")
    export(unet_run, tmp_path / "ok", vae=tuned)
    shipped = load_pipeline_folder(tmp_path / "ok").vae.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in tuned.state_dict().items())
    with pytest.raises(WeightsError, match=r"encoder\.conv_in\.weight differs"):
        export(unet_run, tmp_path / "bad", vae=_changed(trained, "encoder."))
    assert not (tmp_path / "bad").exists()
    _changed(trained, "encoder.").save_pretrained(tmp_path / "other-vae")
    assert cli(["export", str(unet_run), str(tmp_path / "bad"), "--vae", str(tmp_path / "other-vae")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--vae {tmp_path / 'other-vae'}" in err and "encoder.conv_in.weight" in err
    assert not (tmp_path / "bad").exists()
    tuned.save_pretrained(tmp_path / "tuned-vae")
    assert cli(["export", str(unet_run), str(tmp_path / "cli"), "--vae", str(tmp_path / "tuned-vae")]) == 0
    vae = load_pipeline_folder(tmp_path / "cli").vae
    assert torch.equal(vae.decoder.conv_in.weight, tuned.decoder.conv_in.weight)
