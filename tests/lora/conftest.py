"""Fixtures of the LoRA tests: tiny SD 1.x and SD 2.x folders (module-scoped: built once per file)."""

import pytest

from tests.lora._lora import tiny_folder


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("lora_sd1") / "model")


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("lora_sd2") / "model", sd2=True)
