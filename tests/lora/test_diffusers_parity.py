"""LoRA files between us and diffusers on the same tiny weights: the image of each side after loading the other's
file (or its own) agrees within 1/255. diffusers is the reference: its load_lora_weights (and its kohya converter,
_convert_non_diffusers_lora_to_diffusers, inside it) and its save_lora_weights."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from ldm.loading.convert import rename, unet_prefix_map
from ldm.lora.kohya import to_kohya
from ldm.lora.weights import save_lora_file
from tests.lora._lora import PROMPTS, image, max_diff, ours, random_lora

TOL = 1 / 255
pytestmark = pytest.mark.slow  # two pipelines and their images per test: ~10 s each on 2 idle cores, more when busy


def theirs(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def their_image(pipe):
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))  # as tests.lora._lora.image
    return pipe(PROMPTS, num_inference_steps=4, latents=latents, height=32, width=32, output_type="np").images


@pytest.fixture(scope="module")
def base(sd1_folder):
    return image(ours(sd1_folder))


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_our_file_loads_in_diffusers_giving_our_image(sd1_folder, base, tmp_path, layout):
    """kohya: diffusers reads it through its converter (_convert_non_diffusers_lora_to_diffusers), which drops
    alphas that vary by module (its alpha_pattern keys keep the converter's attention-processor names and match no
    module: peft warns "alpha_pattern keys did not match any targeted module"), so that file has one alpha; the
    diffusers layout keeps them (its metadata's alpha_pattern)."""
    pipe = ours(sd1_folder)
    weights = random_lora(pipe, alphas_vary=layout == "diffusers")  # U-Net (Linear, 1x1 and 3x3 conv) and text
    save_lora_file(tmp_path / "l.safetensors", weights, format=layout)
    pipe.load_lora(tmp_path / "l.safetensors")
    ref = theirs(sd1_folder)
    ref.load_lora_weights(str(tmp_path / "l.safetensors"), adapter_name="l")
    got, want = image(pipe), their_image(ref)
    print("max diff", f"{layout}: {max_diff(got, want):.2e}")  # shown with pytest -s
    assert max_diff(got, want) <= TOL, f"{layout}: {max_diff(got, want):.2e}"
    assert max_diff(want, base) > 0.05


def test_a_file_diffusers_saves_loads_giving_diffusers_image(sd1_folder, base, tmp_path):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    trained = theirs(sd1_folder)
    torch.manual_seed(0)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, rank_pattern={"conv1": 2},
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj"])
    text_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    trained.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, trained.text_encoder)  # transformers' add_adapter refuses this peft
    for module in (trained.unet, trained.text_encoder):
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.data *= 0.3  # a visible change, not a saturated image
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(trained.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    ref = theirs(sd1_folder)
    ref.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe = ours(sd1_folder)
    pipe.load_lora(tmp_path, name="theirs")  # a folder: the file save_lora_weights writes there
    got, want = image(pipe), their_image(ref)
    print("max diff", f"{max_diff(got, want):.2e}")  # shown with pytest -s
    assert max_diff(got, want) <= TOL, f"{max_diff(got, want):.2e}"
    assert max_diff(want, base) > 0.05


def test_a_kohya_file_with_compvis_unet_names_matches_diffusers(sd1_folder, base, tmp_path):
    """Named by the original LDM paths (lora_unet_input_blocks_1_1_...): ours maps them with ldm.loading.convert's
    prefix map, diffusers with _maybe_map_sgm_blocks_to_diffusers given the U-Net config."""
    pipe = ours(sd1_folder)
    weights = random_lora(pipe, text=False, alphas_vary=False)  # one alpha: see the kohya case above
    c = pipe.unet.config
    pairs = unet_prefix_map(c.block_out_channels, c.layers_per_block, c.down_block_types, c.up_block_types)
    state = to_kohya(weights)
    ours_names = [k.removeprefix("unet.") for k in weights]
    compvis = rename({n: torch.empty(0) for n in ours_names}, pairs, "to_theirs")
    renamed = {}
    for our, their in zip(ours_names, compvis):
        old, new = "lora_unet_" + our.replace(".", "_"), "lora_unet_" + their.replace(".", "_")
        assert old != new or our in ("conv_in",) or not our.startswith(("down", "mid", "up")), our
        renamed |= {k.replace(old + ".", new + "."): v for k, v in state.items() if k.startswith(old + ".")}
    assert len(renamed) == len(state) and any("input_blocks_1_1" in k for k in renamed)
    save_file(renamed, tmp_path / "compvis.safetensors")
    pipe.load_lora(tmp_path / "compvis.safetensors")
    ref = theirs(sd1_folder)
    ref.load_lora_weights(str(tmp_path / "compvis.safetensors"), unet_config=ref.unet.config)
    got, want = image(pipe), their_image(ref)
    print("max diff", f"{max_diff(got, want):.2e}")  # shown with pytest -s
    assert max_diff(got, want) <= TOL, f"{max_diff(got, want):.2e}"
    assert max_diff(want, base) > 0.05


def _old_layout_key(key: str) -> str:
    """Our diffusers-layout key in diffusers' pre-peft layout (attention processors, lora_linear_layer, .lora.)."""
    module, which = key.rsplit(".lora_", 1)
    updown = "down" if which.startswith("A") else "up"
    for ours_name, old in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                           ("to_out.0", "to_out_lora")):
        if module.startswith("unet.") and module.endswith("." + ours_name):
            return f"{module.removesuffix('.' + ours_name)}.processor.{old}.{updown}.weight"
    layer = "lora_linear_layer" if module.startswith("text_encoder.") else "lora"
    return f"{module}.{layer}.{updown}.weight"


def test_a_file_in_diffusers_pre_peft_layout_loads_as_in_diffusers(sd1_folder, base, tmp_path):
    """2023 files: attention-processor keys (...attn1.processor.to_q_lora.down.weight), LoRACompatible layers
    (...proj_in.lora.down.weight) and the text encoder's lora_linear_layer; no alphas (scale 1)."""
    from ldm.lora.weights import to_diffusers

    pipe = ours(sd1_folder)
    weights = {k: type(m)(m.down, m.up, float(m.rank)) for k, m in random_lora(pipe).items()}
    state, _ = to_diffusers(weights)
    old = {_old_layout_key(k): v for k, v in state.items()}
    assert any(".processor.to_out_lora.up.weight" in k for k in old) and any(".lora_linear_layer." in k for k in old)
    save_file(old, tmp_path / "old.safetensors")
    pipe.load_lora(tmp_path / "old.safetensors")
    ref = theirs(sd1_folder)
    ref.load_lora_weights(str(tmp_path / "old.safetensors"))
    got, want = image(pipe), their_image(ref)
    print("max diff", f"{max_diff(got, want):.2e}")  # shown with pytest -s
    assert max_diff(got, want) <= TOL, f"{max_diff(got, want):.2e}"
    assert max_diff(want, base) > 0.05
