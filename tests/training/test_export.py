"""Export of a training run: which checkpoint each documented form of the path names."""

import pytest


def test_export_finds_the_checkpoint_by_every_documented_form(tmp_path):
    """`ldm export` takes a checkpoint folder, RUN/checkpoints/latest (the README's form), RUN/checkpoints or RUN."""
    from ldm.training.export import find_checkpoint

    run = tmp_path / "run"
    for step in (2, 4):
        (run / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:08d}" / "meta.json").write_text("{}")
    (run / "checkpoints" / "step-00000006").mkdir()  # half-written: no meta.json
    last = run / "checkpoints" / "step-00000004"
    for given in (last, run / "checkpoints" / "latest", run / "checkpoints", run):
        assert find_checkpoint(given) == last, given
    assert find_checkpoint(run / "checkpoints" / "step-00000002") == run / "checkpoints" / "step-00000002"
    for bad in (tmp_path / "nowhere", tmp_path / "nowhere" / "checkpoints" / "latest", run / "checkpoints" / "step-00000006"):
        with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
            find_checkpoint(bad)
