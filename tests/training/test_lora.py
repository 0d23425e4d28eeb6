"""LoRA training (ldm.training.lora): only the adapters train and are checkpointed, kill -9 resume is bitwise, two
processes match one, and the exported file round-trips and loads in diffusers giving our image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.config import ConfigError, load_config
from ldm.io import load_state_dict
from ldm.networks.unet import UNet, UNetConfig
from ldm.training.checkpoint import list_checkpoints, load_weights_only
from ldm.training.export import export, export_lora
from ldm.training.lora import LoraConfig, add_lora, lora_modules
from ldm.training.unet import train
from tests._helpers import ROOT, STEPS, kill_at_checkpoint, tiny_config, tiny_overrides
from tests.training.test_train import assert_same_checkpoint

# a rank-2 LoRA of the U-Net's attention and the text encoder's q/v, lr high enough to move the image within 6 steps
LORA = ["lora.rank=2", "lora.alpha=4", "lora.text_encoder_targets=[q_proj,v_proj]", "optim.lr=3e-3"]
PARTS = ("unet", "text_encoder")


@pytest.fixture(scope="module")
def lora_run(shapes, tmp_path_factory) -> Path:
    """An uninterrupted 6-update LoRA run with checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("lora") / "run"
    train(tiny_config(shapes, out, *LORA))
    return out


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(load_config(UNetConfig, "unet-tiny.yaml"))


def test_only_the_lora_layers_get_gradients():
    """After add_lora every base parameter is frozen: one backward gives grads to lora_A / lora_B only, and
    lora_modules holds exactly those parameters (the same tensors, not copies)."""
    unet = tiny_unet()
    base = {n for n, _ in unet.named_parameters()}
    names = add_lora(unet, LoraConfig(rank=2, init="gaussian"), ["to_q", "attn2.to_k"])
    assert len(names) == 18 and all(n.endswith(("to_q", "attn2.to_k")) for n in names)  # 6 transformer blocks
    x, t, c = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    unet(x, t, encoder_hidden_states=c).pow(2).mean().backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in unet.named_parameters() if p.requires_grad}
    assert len(with_grad) == 36 and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if ".lora_B." in n)
    state = lora_modules(unet)
    assert {id(p) for p in state.parameters()} == {id(p) for n, p in unet.named_parameters() if p.requires_grad}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state.state_dict())
    assert not any(n.startswith(tuple(state.state_dict())) for n in base)


def test_bad_lora_configs_are_named():
    with pytest.raises(ValueError, match="'to_qq' matches no module"):
        add_lora(tiny_unet(), LoraConfig(), ["to_qq"])
    with pytest.raises(ValueError, match="norm1.*LayerNorm"):
        add_lora(tiny_unet(), LoraConfig(), ["norm1"])
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="lora and train_text_encoder"):
        tiny_config(Path("data"), Path("out"), "lora.rank=4", "train_text_encoder=true")


@pytest.mark.slow
def test_the_checkpoint_holds_the_lora_alone(lora_run):
    """The checkpoint's U-Net file holds the 2 x 48 LoRA tensors only (under 3 % of the U-Net's bytes); frozen/ holds
    the base U-Net untouched; the LoRA moved (lora_B starts at zero)."""
    ckpt = lora_run / "checkpoints" / f"step-{STEPS:08d}"
    unet_state = load_state_dict(ckpt / "unet.safetensors")
    assert len(unet_state) == 96 and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in unet_state)
    full = (lora_run / "frozen/unet/diffusion_pytorch_model.safetensors").stat().st_size
    small = (ckpt / "unet.safetensors").stat().st_size
    print(f"LoRA checkpoint {small} bytes, base U-Net {full} bytes")
    assert small < 0.03 * full
    assert all(v.abs().max() > 0 for k, v in unet_state.items() if "lora_B" in k)
    base = load_state_dict(lora_run / "frozen/unet/diffusion_pytorch_model.safetensors")
    torch.manual_seed(0)
    assert not any("lora" in k for k in base)
    with pytest.raises(Exception, match="holds a LoRA"):
        export(ckpt, lora_run.parent / "pipeline")


@pytest.mark.slow
def test_sigkill_mid_lora_training_resumes_to_the_same_weights(lora_run, shapes, tmp_path):
    """SIGKILL after the first checkpoint, resume in a new process: LoRA weights, EMA, optimizer, schedule and data
    position of both parts are bitwise those of the uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ldm.training.unet", "--config", str(ROOT / "ldm/configs/train-tiny.yaml"),
           *tiny_overrides(shapes, out, "run.checkpoint_every=1", *LORA)]
    env = kill_at_checkpoint(cmd, out / "checkpoints/step-00000002")
    done = list_checkpoints(out / "checkpoints")
    assert done and done[-1][0] < STEPS, "the run finished before it was killed"
    result = subprocess.run([*cmd, "--resume", "latest"], check=False, cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    name = f"checkpoints/step-{STEPS:08d}"
    assert_same_checkpoint(lora_run / name, out / name, parts=PARTS)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_round_trips(lora_run, tmp_path, fmt):
    """read_lora_file of the exported file gives the checkpoint's EMA LoRA bit for bit, with alpha 4 (rank 2)."""
    from ldm.lora.weights import read_lora_file

    out = export_lora(lora_run / "checkpoints/latest", tmp_path / "lora.safetensors", format=fmt)
    got = read_lora_file(out)
    ckpt = lora_run / "checkpoints" / f"step-{STEPS:08d}"
    n = 0
    for part, prefix in (("unet", "unet."), ("text_encoder", "text_encoder.")):
        state = load_weights_only(ckpt, part)
        for key, value in state.items():
            module = got[prefix + key.rsplit(".lora_", 1)[0]]
            assert torch.equal(module.down if ".lora_A." in key else module.up, value), key
            assert module.alpha == 4.0
            n += 1
    assert n == 2 * len(got) == 96 + 8  # U-Net: 4 layers x 2 attentions x 6 blocks; text: 2 x 2 layers
    with pytest.raises(FileExistsError, match="exists"):
        export_lora(lora_run, out, format=fmt)


@pytest.mark.slow
def test_ldm_export_lora_writes_the_file_and_refuses_a_vae(lora_run, tmp_path, capsys):
    """`ldm export --lora RUN/checkpoints/latest OUT --format kohya` writes the kohya layout; --vae with --lora is a
    usage error (exit code 2) that writes nothing."""
    from ldm.lora.weights import read_lora_file
    from pipelines.cli import main

    out = tmp_path / "lora.safetensors"
    assert main(["export", "--lora", str(lora_run / "checkpoints/latest"), str(out), "--format", "kohya"]) == 0
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_state_dict(out))
    assert len(read_lora_file(out)) == 52
    other = tmp_path / "other.safetensors"
    assert main(["export", "--lora", str(lora_run), str(other), "--vae", str(tmp_path)]) == 2
    assert "--vae" in capsys.readouterr().err and not other.exists()


@pytest.mark.slow
def test_exported_lora_loads_in_diffusers_with_our_image(lora_run, tmp_path):
    """diffusers' StableDiffusionPipeline on the run's frozen/ (the base) with load_lora_weights(our export) gives the
    image of our Pipeline on the same base with W + (alpha / r) B A merged by hand, within 1/255; the LoRA changes
    the image by more than that (so the comparison can fail)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from ldm.lora.weights import read_lora_file
    from pipelines.text_to_image import Pipeline

    out = export_lora(lora_run, tmp_path / "lora.safetensors", format="diffusers")
    frozen = lora_run / "frozen"
    kw = {"num_inference_steps": 4, "guidance_scale": 5.0, "height": 32, "width": 32, "output_type": "np",
          "latents": torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))}
    theirs = StableDiffusionPipeline.from_pretrained(frozen, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    theirs.set_progress_bar_config(disable=True)
    base = theirs(["a red circle"], **kw).images
    theirs.load_lora_weights(str(out))
    ref = theirs(["a red circle"], **kw).images
    ours = Pipeline.from_pretrained(frozen, device="cpu", dtype=torch.float32)
    models = {"unet": ours.unet, "text_encoder": ours.text_encoder.model}
    with torch.no_grad():
        for key, module in read_lora_file(out).items():
            prefix, path = key.split(".", 1)
            models[prefix].get_submodule(path).weight += module.delta()
    got = ours(["a red circle"], sampler="euler", progress=False, **kw).images
    print(f"max |ours - diffusers| = {np.abs(got - ref).max():.2e}, LoRA effect {np.abs(ref - base).max():.2e}")
    assert np.abs(got - ref).max() <= 1 / 255
    assert np.abs(ref - base).max() > 2 / 255
