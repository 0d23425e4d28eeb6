"""Seeds in the pipeline and the CLI: 64-bit, reproducible from the returned seeds, non-integers refused at once."""

import pytest
import torch

from pipelines.cli import main
from pipelines.text_to_image import Pipeline


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)


def _latents(pipe, **kw):
    return pipe("a red circle", num_inference_steps=2, output_type="latent", progress=False, **kw)


def test_seeds_past_32_bits_draw_their_own_noise_and_reproduce(pipe):
    a, b = _latents(pipe, seed=0), _latents(pipe, seed=2**32)
    assert not torch.equal(a.latents, b.latents)
    assert b.seeds == [2**32]
    assert torch.equal(_latents(pipe, seed=b.seeds).latents, b.latents)
    top = _latents(pipe, seed=2**64 - 1, num_images_per_prompt=2)
    assert top.seeds == [2**64 - 1, 0]  # seed + i wraps in [0, 2**64)
    unseeded = _latents(pipe)
    assert 0 <= unseeded.seeds[0] < 2**64
    assert torch.equal(_latents(pipe, seed=unseeded.seeds).latents, unseeded.latents)


@pytest.mark.parametrize("bad", ["42", 4.0, -1, 2**64, [1, "2"]])
def test_non_integer_or_out_of_range_seeds_are_refused(pipe, bad):
    with pytest.raises(ValueError, match=r"seed(\[1\])? must be an integer in \[0, 2\*\*64\)"):
        _latents(pipe, seed=bad)


@pytest.mark.parametrize("bad", ["2**70", "1180591620717411303424", "-3", "4.5", "x"])
def test_the_cli_refuses_a_bad_seed_before_loading(bad, capsys, monkeypatch):
    import ldm.loading.sources as sources

    monkeypatch.setattr(sources, "load_components", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["generate", "a red circle", "-o", "/nonexistent/x.png", "--seed", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm: error:") and "--seed" in err and len(err.strip().splitlines()) == 1
