"""ldm.training.beside: a function in a second process returns its dict (plus its wall time) or fails loudly."""

from __future__ import annotations

import json

import pytest

from ldm.training.beside import Beside


def test_beside_returns_the_functions_result_and_its_wall_time(tmp_path):
    (tmp_path / "r.json").write_text('{"stale": 1}')  # an old result is removed, not returned
    result = Beside(dict, ({"step": 3, "loss": 0.5},), tmp_path / "r.json").join()
    assert result.pop("wall_s") >= 0 and result == {"step": 3, "loss": 0.5}


def test_beside_failure_is_an_error_naming_the_function(tmp_path):
    with pytest.raises(RuntimeError, match=r"loads beside this process failed \(exit code 1\)"):
        Beside(json.loads, ("not json",), tmp_path / "r.json").join()
    assert not (tmp_path / "r.json").exists()
