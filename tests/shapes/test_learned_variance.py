"""ldm.shapes.learned_variance: the init folder of the bundled model's learned-variance fine-tune (conv_out widened
to 2C outputs, the variance rows zero, a learned_range DDPMScheduler) samples as the bundled model with a fixed
variance."""

from __future__ import annotations

import json

import pytest
import torch

from ldm.diffusion.samplers import SAMPLERS
from ldm.loading.components import load_pipeline_folder
from ldm.loading.sources import DEFAULT_MODEL
from ldm.shapes.learned_variance import (
    drop_variance_head,
    widen_variance_head,
    write_init_folder,
)
from tests._helpers import same_weights


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    threads = torch.get_num_threads()  # restored after the module: later tests compare runs across processes
    torch.set_num_threads(1)
    try:
        folder = write_init_folder(tmp_path_factory.mktemp("lv") / "init")
        yield folder, load_pipeline_folder(folder), load_pipeline_folder(DEFAULT_MODEL)
    finally:
        torch.set_num_threads(threads)


def test_init_folder_widens_conv_out_and_writes_a_learned_range_ddpm_scheduler(init):
    folder, wide, bundled = init
    c = bundled.unet.config.out_channels
    assert wide.unet.config.out_channels == 2 * c == 2 * wide.unet.config.in_channels
    w, b = wide.unet.conv_out.weight, wide.unet.conv_out.bias
    assert torch.equal(w[:c], bundled.unet.conv_out.weight) and torch.equal(b[:c], bundled.unet.conv_out.bias)
    assert not w[c:].any() and not b[c:].any()  # v = 0: Sigma midway between beta_t and beta~_t in log space
    rest = {k: v for k, v in wide.unet.state_dict().items() if not k.startswith("conv_out.")}
    assert same_weights(rest, {k: v for k, v in bundled.unet.state_dict().items() if not k.startswith("conv_out.")})
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDPMScheduler" and config["variance_type"] == "learned_range"
    assert wide.schedule.variance_type == "learned_range"
    assert wide.schedule.prediction_type == bundled.schedule.prediction_type == "v_prediction"
    assert torch.equal(wide.schedule.alphas_cumprod(), bundled.schedule.alphas_cumprod())
    assert {"clip", "classifier"} <= {p.name for p in folder.iterdir()}  # the bundled extras travel along
    assert (folder / "classifier" / "model.safetensors").read_bytes() == \
        (DEFAULT_MODEL / "classifier" / "model.safetensors").read_bytes()


def _ddpm(parts, steps: int, **options) -> tuple[torch.Tensor, object]:
    """DDPM from the same noise and generator with `parts`' U-Net: the final latents and the last variance head."""
    plan = SAMPLERS["ddpm"].plan(parts.schedule, steps)
    text = parts.text_encoder.encode(["a red circle", "a blue square"])
    model = plan.denoiser(parts.unet)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * plan.prior_scale
    with torch.no_grad():
        out = SAMPLERS["ddpm"](model, x, plan.sigmas, cond={"encoder_hidden_states": text},
                               generator=torch.Generator().manual_seed(1), **plan.options, **options)
        _, head = model.with_variance(x, plan.sigmas[0] * x.new_ones(2), encoder_hidden_states=text) \
            if hasattr(model, "with_variance") else (None, None)
    return out, head


def test_init_samples_as_the_bundled_model_with_a_fixed_variance(init):
    """DDPM with variance="small" (beta~_t) on the widened U-Net vs the bundled U-Net's DDPM (beta~_t: no head), same
    noise and generator, 8 steps. Tolerance 1e-5: conv_out with 8 output rows may accumulate in another order than
    with 4 (measured: 0 on this CPU)."""
    _, wide, bundled = init
    ours, head = _ddpm(wide, 8, variance="small")
    theirs, none = _ddpm(bundled, 8)
    assert none is None and head is not None and not head.values.any()  # the init's head reads v = 0
    assert (ours - theirs).abs().max() < 1e-5


def test_init_pipeline_equals_the_bundled_pipeline_with_euler(init):
    """Every sampler but DDPM drops the head: the pipelines' latents agree (Euler 6 steps, guidance 3), 1e-5
    (measured 0)."""
    from pipelines.text_to_image import Pipeline

    folder, _, _ = init
    kw = {"num_inference_steps": 6, "guidance_scale": 3.0, "sampler": "euler", "seed": 0, "output_type": "latent",
          "progress": False}
    ours = Pipeline.from_pretrained(folder, dtype=torch.float32)(["a green star"], **kw).images
    theirs = Pipeline(dtype=torch.float32)(["a green star"], **kw).images
    assert (ours - theirs).abs().max() < 1e-5


def test_drop_is_the_inverse_of_widen_and_bad_inputs_are_refused(init):
    _, wide, bundled = init
    assert same_weights(drop_variance_head(widen_variance_head(bundled.unet)), bundled.unet)
    with pytest.raises(ValueError, match="fixed-variance U-Net"):
        widen_variance_head(wide.unet)
    with pytest.raises(ValueError, match="no variance head"):
        drop_variance_head(bundled.unet)


def test_init_from_a_learned_folder_is_refused(init, tmp_path):
    folder, _, _ = init
    with pytest.raises(ValueError, match="already has a learned variance"):
        write_init_folder(tmp_path / "again", source=folder)
