"""Seeds: every integer in [0, 2**64) draws its own noise; seeds below 2**32 draw torch's (and diffusers') noise."""

import numpy as np
import pytest
import torch

from ldm.random import check_seed, cpu_generator


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(64, generator=cpu_generator(seed))


def test_seeds_below_2_32_are_torch_manual_seed():
    for seed in (0, 1, 42, 2**32 - 1):
        assert torch.equal(_noise(seed), torch.randn(64, generator=torch.Generator().manual_seed(seed)))


def test_the_high_32_bits_count_and_a_seed_reproduces():
    assert torch.equal(torch.randn(64, generator=torch.Generator().manual_seed(0)),
                       torch.randn(64, generator=torch.Generator().manual_seed(2**32)))  # torch alone: 32 bits
    seeds = [0, 2**32, 2**33, 2**32 + 1, 2**63, 2**64 - 1, 7 * 2**40 + 5]
    draws = [_noise(s) for s in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert not torch.equal(draws[i], draws[j]), (seeds[i], seeds[j])
    for s, d in zip(seeds, draws):
        assert torch.equal(_noise(s), d)
        assert cpu_generator(s).initial_seed() == s
    big = _noise(2**40 + 3)
    assert abs(float(big.mean())) < 0.5 and 0.6 < float(big.std()) < 1.4  # still standard normal noise


def test_the_state_is_mt19937_init_by_array_of_the_two_halves():
    """torch's randint below 2**31 keeps every other 31-bit mt19937 word (seen for manual_seed below, the same
    relation to numpy's legacy RandomState); above 2**32 the words are those of init_by_array([low, high])."""
    def torch_words(g):
        return torch.randint(0, 2**31, (8,), generator=g).tolist()

    assert torch_words(torch.Generator().manual_seed(5)) == np.random.RandomState(5).randint(0, 2**31, 16)[1::2].tolist()
    seed = 0x1234_5678_9ABC_DEF0
    ref = np.random.RandomState(np.array([0x9ABC_DEF0, 0x1234_5678], dtype=np.uint32))
    assert torch_words(cpu_generator(seed)) == ref.randint(0, 2**31, 16)[1::2].tolist()


@pytest.mark.parametrize("bad", [-1, 2**64, 1.0, 1.5, "42", b"4", True, None, [1]])
def test_bad_seeds_are_refused(bad):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        check_seed(bad)


def test_numpy_integers_are_seeds():
    assert check_seed(np.int64(5)) == 5 and check_seed(np.uint64(2**63)) == 2**63
