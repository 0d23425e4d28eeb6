"""LoRAs in the Pipeline: each layout on SD 1.x and SD 2.x gives the image of the weights merged by hand (within
1/255), scales, several adapters, unloading, fusing, dtype changes, and strict errors that leave the pipeline as it
was."""

import pytest
import torch
from torch import nn

from ldm.io import WeightsError
from ldm.lora.layers import lora_layers
from ldm.lora.weights import LoraModule, save_lora_file
from tests.lora._lora import image, max_diff, merge_by_hand, ours, random_lora

TOL = 1 / 255  # images in [0, 1]


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    """(pipe, its base image): tests leave the pipe as they found it (no LoRA loaded, unfused, fp32)."""
    pipe = ours(sd1_folder)
    return pipe, image(pipe)


@pytest.fixture
def pipe(sd1):
    p, _ = sd1
    yield p
    p.unfuse_lora()
    p.unload_lora()
    p.to(dtype=torch.float32)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def merged_by_hand(request):
    """(family, pipe, a random LoRA, the image of the weights merged by hand, the base image)."""
    folder = request.getfixturevalue(f"{request.param}_folder")
    pipe, by_hand = ours(folder), ours(folder)
    weights = random_lora(pipe)  # Linear, 1x1 and 3x3 conv, U-Net and text encoder; ranks and alphas vary
    merge_by_hand(by_hand, weights)
    return request.param, pipe, weights, image(by_hand), image(pipe)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_lora_file_gives_the_image_of_the_weights_merged_by_hand(merged_by_hand, tmp_path, layout):
    family, pipe, weights, ref, base = merged_by_hand
    save_lora_file(tmp_path / "l.safetensors", weights, format=layout)
    assert pipe.load_lora(tmp_path / "l.safetensors") == "l"
    try:
        got = image(pipe)
    finally:
        pipe.unload_lora("l")
    print("max diff", f"{family} {layout}: {max_diff(got, ref):.2e}")  # shown with pytest -s
    assert max_diff(got, ref) <= TOL, f"{family} {layout}: {max_diff(got, ref):.2e}"
    assert max_diff(ref, base) > 0.05  # the LoRA changes the image: the comparison can fail


def test_scales_and_two_adapters_at_once_match_the_hand_merged_sum(pipe, sd1_folder, tmp_path):
    a, b = random_lora(pipe, seed=1), random_lora(pipe, seed=2, text=False, rank=3)
    save_lora_file(tmp_path / "a.safetensors", a, format="kohya")
    save_lora_file(tmp_path / "b.safetensors", b, format="diffusers")
    pipe.load_lora(tmp_path / "a.safetensors", scale=0.5)
    pipe.load_lora(tmp_path / "b.safetensors", name="second", scale=1.0)
    pipe.set_lora_scale("second", -0.7)
    assert pipe.lora_scales == {"a": 0.5, "second": -0.7}
    by_hand = ours(sd1_folder)
    merge_by_hand(by_hand, a, 0.5)
    merge_by_hand(by_hand, b, -0.7)
    assert max_diff(image(pipe), image(by_hand)) <= TOL


def test_scale_zero_is_no_lora_and_unloading_restores_the_plain_layers(pipe, sd1, tmp_path):
    _, base = sd1
    save_lora_file(tmp_path / "l.safetensors", random_lora(pipe), format="diffusers")
    pipe.load_lora(tmp_path / "l.safetensors", scale=0.0)
    assert max_diff(image(pipe), base) <= 1e-6
    pipe.set_lora_scale("l", 1.0)
    assert max_diff(image(pipe), base) > 0.05
    pipe.unload_lora("l")
    assert pipe.lora_names == [] and not list(lora_layers(pipe.unet)) and not list(lora_layers(pipe.text_encoder.model))
    assert type(pipe.unet.conv_in) is nn.Conv2d
    assert max_diff(image(pipe), base) == 0.0


def test_fused_gives_the_unfused_image_and_unfusing_restores_the_weights(pipe, tmp_path):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    save_lora_file(tmp_path / "l.safetensors", random_lora(pipe), format="kohya")
    pipe.load_lora(tmp_path / "l.safetensors", scale=0.8)
    unfused = image(pipe)
    pipe.fuse_lora()
    assert pipe.lora_fused and max_diff(image(pipe), unfused) <= TOL
    pipe.set_lora_scale("l", 0.4)  # fused again at the new scale
    fused = image(pipe)
    assert pipe.lora_fused and max_diff(fused, unfused) > 0.01
    pipe.unfuse_lora()
    assert not pipe.lora_fused and max_diff(image(pipe), fused) <= TOL  # unfused at 0.4
    after = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    worst = max(float((after[k] - v).abs().max()) for k, v in before.items())
    assert worst <= 1e-5, f"unfused weights differ from the originals by {worst:.2e}"


def test_fused_and_unfused_state_survive_a_dtype_change(pipe, tmp_path):
    """Fused in float32, moved to float64: still fused (the update neither lost nor added twice), and unfusing there
    gives back the float32 weights."""
    plain = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    save_lora_file(tmp_path / "l.safetensors", random_lora(pipe), format="diffusers")
    pipe.load_lora(tmp_path / "l.safetensors")
    pipe.fuse_lora()
    fused = image(pipe)
    pipe.to(dtype=torch.float64)
    assert pipe.lora_fused and pipe.unet.conv_in.lora_A["l"].weight.dtype == torch.float64
    assert max_diff(image(pipe), fused) <= TOL
    pipe.unfuse_lora()
    restored = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    worst = max(float((restored[k] - v.double()).abs().max()) for k, v in plain.items())
    assert worst <= 1e-5, f"unfused float64 weights differ from the float32 ones by {worst:.2e}"


def test_a_module_the_model_lacks_is_an_error_naming_the_key_and_nothing_changes(pipe, tmp_path):
    weights = random_lora(pipe, text=False)
    weights["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q"] = LoraModule(
        torch.zeros(2, 32), torch.zeros(32, 2), 2.0)
    save_lora_file(tmp_path / "stray.safetensors", weights, format="kohya")
    with pytest.raises(WeightsError, match=r"'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q' "
                                           r"\(unet.down_blocks.0.attentions.0.transformer_blocks.0.attn3.to_q\) "
                                           r"matches no module of the unet"):
        pipe.load_lora(tmp_path / "stray.safetensors")
    assert pipe.lora_names == [] and not list(lora_layers(pipe.unet))


def test_a_shape_mismatch_names_the_key_and_both_shapes(pipe, tmp_path):
    weights = random_lora(pipe)
    weights["text_encoder.encoder.layers.0.mlp.fc2"] = LoraModule(torch.zeros(2, 64), torch.zeros(32, 2), 2.0)
    save_lora_file(tmp_path / "bad.safetensors", weights, format="diffusers")
    with pytest.raises(WeightsError, match=r"text_encoder.encoder.layers.0.mlp.fc2: down \(2, 64\) / up \(32, 2\) "
                                           r"do not fit the layer's weight \(32, 128\): expected down \(2, 128\)"):
        pipe.load_lora(tmp_path / "bad.safetensors")
    assert pipe.lora_names == [] and not list(lora_layers(pipe.unet))


def test_names_and_scales_are_checked(pipe, tmp_path):
    save_lora_file(tmp_path / "my.style.safetensors", random_lora(pipe, text=False), format="kohya")
    assert pipe.load_lora(tmp_path / "my.style.safetensors") == "my_style"
    with pytest.raises(ValueError, match="'my_style' is already loaded"):
        pipe.load_lora(tmp_path / "my.style.safetensors")
    with pytest.raises(KeyError, match="no LoRA named 'other'"):
        pipe.set_lora_scale("other", 1.0)
    with pytest.raises(ValueError, match="finite number"):
        pipe.set_lora_scale("my_style", float("nan"))


def test_openclip_named_text_encoder_loras_adapt_the_clip_layers_they_name(sd2_folder, tmp_path):
    """SD 2.x files may name the text encoder by its OpenCLIP tower (A1111): attn.in_proj is q, k and v sharing one
    down, mlp.c_fc is fc1. They encode prompts as the same LoRA in CLIP names does, and the cached empty-prompt
    embedding follows the LoRA."""
    from safetensors.torch import save_file

    from ldm.lora.kohya import to_kohya

    pipe = ours(sd2_folder)
    g = torch.Generator().manual_seed(0)
    down, up, fc_down, fc_up = (torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g),
                                torch.randn(2, 32, generator=g), torch.randn(128, 2, generator=g))
    save_file({"lora_te_model_transformer_resblocks_1_attn_in_proj.lora_down.weight": down,
               "lora_te_model_transformer_resblocks_1_attn_in_proj.lora_up.weight": up,
               "lora_te_model_transformer_resblocks_1_attn_in_proj.alpha": torch.tensor(1.0),
               "lora_te_model_transformer_resblocks_0_mlp_c_fc.lora_down.weight": fc_down,
               "lora_te_model_transformer_resblocks_0_mlp_c_fc.lora_up.weight": fc_up}, tmp_path / "openclip.safetensors")
    clip = {f"text_encoder.encoder.layers.1.self_attn.{p}_proj": LoraModule(down.clone(), u.clone(), 1.0)
            for p, u in zip("qkv", up.chunk(3))}
    clip["text_encoder.encoder.layers.0.mlp.fc1"] = LoraModule(fc_down, fc_up, 2.0)
    save_file(to_kohya(clip), tmp_path / "clip.safetensors")
    base, empty = pipe.text_encoder.encode(["a cat"]), pipe.text_encoder.empty_embedding()
    pipe.load_lora(tmp_path / "openclip.safetensors")
    named_openclip, empty_lora = pipe.text_encoder.encode(["a cat"]), pipe.text_encoder.empty_embedding()
    pipe.unload_lora()
    assert torch.equal(pipe.text_encoder.empty_embedding(), empty)
    pipe.load_lora(tmp_path / "clip.safetensors")
    assert (named_openclip - pipe.text_encoder.encode(["a cat"])).abs().max() <= 1e-6
    assert (named_openclip - base).abs().max() > 1e-2 and (empty_lora - empty).abs().max() > 1e-2


def test_a_fused_lora_is_saved_merged_and_an_unfused_one_is_refused(pipe, tmp_path):
    save_lora_file(tmp_path / "l.safetensors", random_lora(pipe), format="kohya")
    pipe.load_lora(tmp_path / "l.safetensors")
    with pytest.raises(ValueError, match=r"save_pretrained with LoRAs loaded and not fused \(l\): fuse_lora\(\)"):
        pipe.save_pretrained(tmp_path / "folder")
    assert not (tmp_path / "folder").exists()
    with pytest.raises(ValueError, match=r"export with LoRAs loaded \(l\) would write peft's layers"):
        pipe.check_no_lora("export")  # for savers that cannot write merged weights (the upscaler's)
    pipe.fuse_lora()
    fused = image(pipe)
    pipe.save_pretrained(tmp_path / "folder")
    assert pipe.lora_fused and list(lora_layers(pipe.unet))  # the LoRA stays loaded and fused
    saved = ours(tmp_path / "folder")
    assert not list(lora_layers(saved.unet)) and max_diff(image(saved), fused) <= TOL
    assert max_diff(image(pipe), fused) == 0.0
