"""LoRA files: both layouts round-trip exactly, the layout is detected, every key is checked (errors name it)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ldm.io import WeightsError
from ldm.lora.kohya import dotted, kohya_name, to_kohya
from ldm.lora.weights import (
    LoraModule,
    lora_weights_of,
    read_lora_file,
    save_lora_file,
    to_diffusers,
)
from pipelines.tiny import tiny_components


def _weights(seed: int = 0) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(
            torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 4.0),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": LoraModule(
            torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g), 1.0),
        "unet.down_blocks.0.resnets.0.conv1": LoraModule(  # LoCon: a 3x3 convolution
            torch.randn(4, 32, 3, 3, generator=g), torch.randn(32, 4, 1, 1, generator=g), 2.5),
        "unet.mid_block.attentions.0.proj_in": LoraModule(  # a 1x1 convolution
            torch.randn(4, 64, 1, 1, generator=g), torch.randn(64, 4, 1, 1, generator=g), 4.0),
        "text_encoder.encoder.layers.1.self_attn.q_proj": LoraModule(
            torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g), 8.0),
    }  # fmt: skip


def _same(a: dict[str, LoraModule], b: dict[str, LoraModule]) -> None:
    assert set(a) == set(b)
    for k, m in a.items():
        assert torch.equal(m.down, b[k].down) and torch.equal(m.up, b[k].up), k
        assert m.alpha == b[k].alpha, k


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_a_file_reads_back_bit_exact_with_ranks_and_alphas_varying_by_module(tmp_path, layout):
    w = _weights()
    save_lora_file(tmp_path / "l.safetensors", w, format=layout, metadata={"note": "kept"})
    _same(read_lora_file(tmp_path / "l.safetensors"), w)
    from ldm.lora.weights import file_metadata

    assert file_metadata(tmp_path / "l.safetensors")["note"] == "kept"


def test_the_layouts_use_diffusers_and_kohya_key_names(tmp_path):
    state, meta = to_diffusers(_weights())
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in state
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_B.weight" in state
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.rank_pattern"] == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0": 2}
    assert config["unet.alpha_pattern"]["down_blocks.0.resnets.0.conv1"] == 2.5
    kohya = to_kohya(_weights())
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in kohya
    assert kohya["lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha"].item() == 8.0


def test_kohya_names_are_read_back_as_module_paths():
    for key in ["unet.down_blocks.1.resnets.0.conv_shortcut", "unet.mid_block.resnets.1.time_emb_proj",
                "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj", "unet.time_embedding.linear_1",
                "unet.conv_in", "unet.conv_norm_out", "unet.up_blocks.0.upsamplers.0.conv",
                "text_encoder.encoder.layers.0.mlp.fc2", "text_encoder.encoder.layers.11.self_attn.out_proj"]:
        name = kohya_name(key)
        prefix, path = key.split(".", 1)
        if prefix == "unet":
            assert name == "lora_unet_" + path.replace(".", "_") and dotted(name.removeprefix("lora_unet_")) == path
        else:
            assert name == "lora_te_text_model_" + path.replace(".", "_")
            assert dotted(name.removeprefix("lora_te_")) == "text_model." + path


def test_lora_weights_of_reads_peft_layers():
    import peft

    unet = tiny_components(0).unet
    peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=6, target_modules=["to_q", "conv1"],
                                                 init_lora_weights=False), unet, adapter_name="mine")
    w = lora_weights_of(unet, "unet", adapter="mine")
    assert len(w) == sum(1 for n, _ in unet.named_modules() if n.endswith((".to_q", ".conv1")))
    m = w["unet.down_blocks.0.resnets.0.conv1"]
    assert m.down.shape == (3, 32, 3, 3) and m.up.shape == (32, 3, 1, 1) and m.alpha == 6.0
    assert torch.equal(m.down, unet.down_blocks[0].resnets[0].conv1.lora_A["mine"].weight)
    with pytest.raises(ValueError, match="adapter 'other'"):
        lora_weights_of(unet, "unet", adapter="other")


def test_diffusers_files_without_alphas_have_scale_one_and_per_module_alphas_are_read(tmp_path):
    state, _ = to_diffusers(_weights())
    save_file(state, tmp_path / "bare.safetensors")
    assert all(m.alpha == m.rank for m in read_lora_file(tmp_path / "bare.safetensors").values())
    key = "unet.down_blocks.0.resnets.0.conv1"
    save_file({**state, f"{key}.alpha": torch.tensor(7.0)}, tmp_path / "alpha.safetensors")
    assert read_lora_file(tmp_path / "alpha.safetensors")[key].alpha == 7.0


def test_a_kohya_file_without_alphas_has_alpha_equal_to_rank(tmp_path):
    state = {k: v for k, v in to_kohya(_weights()).items() if not k.endswith(".alpha")}
    save_file(state, tmp_path / "l.safetensors")
    assert all(m.alpha == m.rank for m in read_lora_file(tmp_path / "l.safetensors").values())


def test_openclip_named_text_encoder_modules_map_to_the_clip_layers(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g)
    state = {"lora_te_model_transformer_resblocks_1_attn_in_proj.lora_down.weight": down,
             "lora_te_model_transformer_resblocks_1_attn_in_proj.lora_up.weight": up,
             "lora_te_model_transformer_resblocks_0_mlp_c_fc.lora_down.weight": down.clone(),
             "lora_te_model_transformer_resblocks_0_mlp_c_fc.lora_up.weight": up[:32].clone()}
    save_file(state, tmp_path / "l.safetensors")
    w = read_lora_file(tmp_path / "l.safetensors")
    assert set(w) == {"text_encoder.encoder.layers.1.self_attn.q_proj",
                      "text_encoder.encoder.layers.1.self_attn.k_proj",
                      "text_encoder.encoder.layers.1.self_attn.v_proj", "text_encoder.encoder.layers.0.mlp.fc1"}
    assert torch.equal(w["text_encoder.encoder.layers.1.self_attn.k_proj"].up, up[32:64])  # in_proj = [q; k; v]


def test_compvis_named_unet_modules_need_and_use_the_unet_config(tmp_path):
    from ldm.loading.convert import rename, unet_prefix_map

    config = tiny_components(0).unet.config
    w = {k: m for k, m in _weights().items() if k.startswith("unet.")}
    pairs = unet_prefix_map(config.block_out_channels, config.layers_per_block, config.down_block_types,
                            config.up_block_types)
    theirs = rename({k.removeprefix("unet."): torch.empty(0) for k in w}, pairs, "to_theirs")
    assert "input_blocks.1.0.in_layers.2" in theirs  # down_blocks.0.resnets.0.conv1
    state = {}
    for (key, m), name in zip(w.items(), theirs):
        base = "lora_unet_" + name.replace(".", "_")
        state |= {f"{base}.lora_down.weight": m.down, f"{base}.lora_up.weight": m.up,
                  f"{base}.alpha": torch.tensor(m.alpha)}
    save_file(state, tmp_path / "l.safetensors")
    with pytest.raises(WeightsError, match="lora_unet_input_blocks_1_.*CompVis path.*unet_config"):
        read_lora_file(tmp_path / "l.safetensors")
    _same(read_lora_file(tmp_path / "l.safetensors", unet_config=config), w)


@pytest.mark.parametrize("extra, match", [
    ({"unet.conv_in.weight": torch.zeros(1)}, "'unet.conv_in.weight': not a LoRA weight"),
    ({"vae.decoder.conv_in.lora_A.weight": torch.zeros(1, 4)}, "'vae.decoder.conv_in' names no component"),
    ({"unet.conv_out.lora_A.weight": torch.zeros(1, 4)}, "'unet.conv_out': has lora_A.weight but no lora_B"),
    ({"unet.conv_out.lora_magnitude_vector": torch.zeros(4)}, "DoRA is not supported"),
    ({"unet.conv_out.alpha": torch.tensor(1.0)}, "'unet.conv_out.alpha': an alpha of a module that has no"),
])
def test_a_diffusers_file_with_a_stray_key_is_an_error_naming_it(tmp_path, extra, match):
    state, meta = to_diffusers(_weights())
    save_file({**state, **extra}, tmp_path / "l.safetensors", metadata=meta)
    with pytest.raises(WeightsError, match=match):
        read_lora_file(tmp_path / "l.safetensors")


@pytest.mark.parametrize("extra, match", [
    ({"lora_unet_conv_in.weight": torch.zeros(1)}, "'lora_unet_conv_in.weight': not a lora_down"),
    ({"lora_vae_conv_in.lora_down.weight": torch.zeros(1)}, "'lora_vae_conv_in.lora_down.weight' names no component"),
    ({"lora_unet_conv_out.lora_down.weight": torch.zeros(1, 4)}, "'lora_unet_conv_out' has no lora_up.weight"),
    ({"lora_unet_conv_out.hada_w1_a": torch.zeros(1, 4)}, "LoHa is not supported"),
    ({"lora_unet_conv_out.alpha": torch.tensor(1.0)}, "'lora_unet_conv_out' has no lora_down.weight"),
    ({"lora_unet_conv_in.lora_up.weight": torch.zeros(32, 3, 1, 1)}, "up \\(32, 3, 1, 1\\) has rank 3 where down"),
])
def test_a_kohya_file_with_a_stray_key_is_an_error_naming_it(tmp_path, extra, match):
    state = {**to_kohya(_weights()), "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
             "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 2, 1, 1)}
    save_file({**state, **extra}, tmp_path / "l.safetensors")
    with pytest.raises(WeightsError, match=match):
        read_lora_file(tmp_path / "l.safetensors")


def test_a_file_that_is_not_a_lora_is_a_clear_error(tmp_path):
    save_file(dict(tiny_components(0).unet.state_dict()), tmp_path / "unet.safetensors")
    with pytest.raises(WeightsError, match="is not a LoRA file: no key is a LoRA weight.*first keys"):
        read_lora_file(tmp_path / "unet.safetensors")


def test_a_pickle_file_needs_allow_pickle(tmp_path):
    torch.save(to_kohya(_weights()), tmp_path / "l.ckpt")
    with pytest.raises(WeightsError, match="pickle file.*allow_pickle=True"):
        read_lora_file(tmp_path / "l.ckpt")
    _same(read_lora_file(tmp_path / "l.ckpt", allow_pickle=True), _weights())


def test_rslora_and_dora_in_diffusers_metadata(tmp_path):
    """rsLoRA's scale alpha / sqrt(r) is kept as alpha sqrt(r) / r; DoRA is refused, not read as plain LoRA."""
    state, _ = to_diffusers(_weights())
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True, "unet.rank_pattern": {"to_out.0": 2}}
    save_file(state, tmp_path / "rs.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)})
    m = read_lora_file(tmp_path / "rs.safetensors")["unet.down_blocks.0.resnets.0.conv1"]
    assert m.alpha / m.rank == pytest.approx(8 / 4**0.5)
    save_file(state, tmp_path / "dora.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({**config, "unet.use_dora": True})})
    with pytest.raises(WeightsError, match="DoRA"):
        read_lora_file(tmp_path / "dora.safetensors")
