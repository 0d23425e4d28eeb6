"""Component folders: our save -> diffusers load, diffusers save -> our load, our save -> our load, all bit-exact."""

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE
from diffusers import UNet2DConditionModel

from autoencoder.model import AutoencoderKL, VAEConfig
from ldm.config import load_config
from ldm.io import WeightsError, save_state_dict
from ldm.networks.unet import UNet, UNetConfig
from tests._helpers import same_weights


@pytest.fixture(scope="module")
def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(load_config(UNetConfig, "unet-tiny.yaml"))


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(load_config(VAEConfig, "vae-tiny.yaml"))


def test_unet_folder_round_trips_both_ways_with_diffusers(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path / "unet")
    assert same_weights(UNet.from_pretrained(tmp_path / "unet").state_dict(), tiny_unet.state_dict())
    theirs = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert same_weights(theirs.state_dict(), tiny_unet.state_dict())
    theirs.save_pretrained(tmp_path / "theirs")
    back = UNet.from_pretrained(tmp_path / "theirs")
    assert same_weights(back.state_dict(), tiny_unet.state_dict()) and back.config == tiny_unet.config


def test_vae_folder_round_trips_both_ways_with_diffusers(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "vae")
    theirs = DiffusersVAE.from_pretrained(tmp_path / "vae")
    assert same_weights(theirs.state_dict(), tiny_vae.state_dict())
    theirs.save_pretrained(tmp_path / "theirs")
    back = AutoencoderKL.from_pretrained(tmp_path / "theirs")
    assert same_weights(back.state_dict(), tiny_vae.state_dict()) and back.config == tiny_vae.config


def test_from_pretrained_names_the_bad_key(tmp_path, tiny_unet):
    tiny_unet.save_pretrained(tmp_path / "unet")
    sd = dict(tiny_unet.state_dict())
    sd["conv_in.weight"] = torch.zeros(1, 2, 3, 3)
    save_state_dict(sd, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError, match=r"conv_in.weight: model \(\d+, 4, 3, 3\) vs file \(1, 2, 3, 3\)"):
        UNet.from_pretrained(tmp_path / "unet")


def test_from_pretrained_dtype(tmp_path, tiny_vae):
    tiny_vae.save_pretrained(tmp_path / "vae")
    assert AutoencoderKL.from_pretrained(tmp_path / "vae", dtype=torch.float16).decoder.conv_out.weight.dtype == torch.float16
