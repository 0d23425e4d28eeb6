"""Fixtures shared by the tests: the training data; torch's thread count restored after every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.shapes.dataset import export_imagefolder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """16 captioned 32 px shapes images (train split, seed 0) as an imagefolder with metadata.jsonl."""
    return export_imagefolder(tmp_path_factory.mktemp("data") / "shapes", 16, "train", 0, size=32)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count in-process (`ldm generate --threads 1` through the CLI's main, a
    fixture) must not leak it: the kill -9 resume tests compare an in-process run with a subprocess bit for bit."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
