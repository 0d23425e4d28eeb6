"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ldm.shapes.dataset import export_imagefolder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """16 captioned 32 px shapes images (train split, seed 0) as an imagefolder with metadata.jsonl."""
    return export_imagefolder(tmp_path_factory.mktemp("data") / "shapes", 16, "train", 0, size=32)
