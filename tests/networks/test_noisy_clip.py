"""The noise-aware CLIP (ldm.networks.noisy_clip) and the trunk it shares with the noisy classifier: unit embeddings
and their cosine, the pooled text input (the EOS state), a bit-exact folder round trip, errors naming the key, and
classifier folders (the bundled one included) loading bit-exactly after the trunk was shared."""

import math

import pytest
import torch
from safetensors.torch import load_file

from ldm.io import load_state_dict, save_state_dict
from ldm.loading.sources import DEFAULT_MODEL
from ldm.networks.classifier import NoisyClassifier
from ldm.networks.noisy_clip import (
    NoisyCLIP,
    NoisyCLIPConfig,
    pooled_text,
    pooled_text_dim,
)
from ldm.random import seeded
from pipelines.tiny import tiny_components


def tiny(text_dim: int = 32) -> NoisyCLIP:
    with seeded(0):
        return NoisyCLIP(NoisyCLIPConfig(sample_size=4, block_out_channels=(8, 16), time_embed_dim=16,
                                         norm_num_groups=4, text_dim=text_dim, embed_dim=12)).eval()


def test_embeddings_are_unit_vectors_and_forward_is_their_cosine() -> None:
    """|g| = |h| = 1 (1e-6); forward = sum(g * h) exactly; t reaches g; logit_scale starts at log(1 / 0.07)."""
    model, g = tiny(), torch.Generator().manual_seed(0)
    x, pooled = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 32, generator=g)
    t = torch.tensor([0.0, 500.0, 999.0])
    image, text = model.encode_image(x, t), model.encode_text(pooled)
    assert image.shape == text.shape == (3, 12)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
    assert torch.equal(model(x, t, pooled), (image * text).sum(-1))
    assert not torch.equal(image, model.encode_image(x, torch.full((3,), 250.0)))
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07), rel=1e-7)  # CLIP's init
    assert model.text_proj.bias is None


def test_pooled_text_is_the_eos_state_of_the_models_own_encoder() -> None:
    """pooled_text = the final-LayerNorm state at the EOS token of the prompt's window (exact)."""
    enc = tiny_components(seed=0).text_encoder
    prompts = ["a red circle", "a small blue square left of a green star"]
    pooled = pooled_text(enc, prompts)
    ids = enc.tokenize(prompts)
    eos = (ids == enc.tokenizer.eos_token_id).int().argmax(1)
    states = enc.encode(prompts)  # (B, 77, D), last layer after the final LayerNorm
    torch.testing.assert_close(pooled, states[torch.arange(2), eos], rtol=0, atol=1e-6)
    assert pooled_text_dim(enc) == 32 == pooled.shape[1]


def test_folder_round_trip_is_bit_exact(tmp_path) -> None:
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(3.25)
    model.save_pretrained(tmp_path / "clip")
    loaded = NoisyCLIP.from_pretrained(tmp_path / "clip")
    assert loaded.config == model.config and not loaded.training
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x, t, p = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.randn(2, 32)
    assert torch.equal(model(x, t, p), loaded(x, t, p))


def test_loading_errors_name_the_key_or_the_class(tmp_path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path / "clip")
    weights = tmp_path / "clip" / "model.safetensors"
    state = load_state_dict(weights)
    save_state_dict({**state, "extra.weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
        NoisyCLIP.from_pretrained(tmp_path / "clip")
    save_state_dict({k: v for k, v in state.items() if k != "text_proj.weight"}, weights)
    with pytest.raises(ValueError, match=r"missing keys \['text_proj.weight'\]"):
        NoisyCLIP.from_pretrained(tmp_path / "clip")
    save_state_dict({**state, "text_proj.weight": torch.zeros(12, 16)}, weights)
    with pytest.raises(ValueError, match=r"text_proj.weight has shape \(12, 16\), the config asks for \(12, 32\)"):
        NoisyCLIP.from_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="holds a NoisyClassifier, not a NoisyCLIP"):
        NoisyCLIP.from_pretrained(DEFAULT_MODEL / "classifier")
    with pytest.raises(ValueError, match=r"takes pooled text embeddings \(B, 32\), got shape \(2, 16\)"):
        model.encode_text(torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"noise-aware CLIP takes \(B, 4, H, W\) latents"):
        model.encode_image(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="text_dim and embed_dim must be >= 1"):
        NoisyCLIPConfig(embed_dim=0)


def test_the_bundled_classifier_still_loads_bit_exactly() -> None:
    """The shared trunk kept the classifier's state-dict keys: the shipped folder loads with every tensor equal to
    the file's, and a classifier folder is refused as a NoisyCLIP (above) rather than half-read."""
    folder = DEFAULT_MODEL / "classifier"
    clf = NoisyClassifier.from_pretrained(folder)
    file = load_file(str(folder / "model.safetensors"))
    own = clf.state_dict()
    assert own.keys() == file.keys() and all(torch.equal(own[k], file[k]) for k in own)
    assert {k.split(".")[0] for k in own} == {"time_mlp", "conv_in", "blocks", "norm_out", "head"}
