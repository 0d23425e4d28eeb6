"""Export never loses a user's files: a folder holding other files, the run itself, a folder holding the run and "."
are refused (or handled) with every file intact; a pipeline folder is replaced, anything else only with overwrite."""

from __future__ import annotations

import pytest

from ldm.training.export import export
from ldm.training.unet import train
from pipelines.cli import main
from tests._helpers import tiny_config


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "run"
    train(tiny_config(shapes, out, "run.max_steps=2"))
    return out


def test_a_folder_holding_a_users_files_is_refused_and_kept(run, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"already holds files this did not write \(notes.txt\)"):
        export(run, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["export", str(run), str(tmp_path / "mine")]) == 2  # one `ldm: error:` line, exit 2
    assert "refusing to replace it" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    export(run, tmp_path / "mine", overwrite=True)  # said explicitly: replaced whole
    assert (tmp_path / "mine" / "model_index.json").is_file() and not (tmp_path / "mine" / "notes.txt").exists()


def test_the_run_and_folders_holding_it_are_refused(run):
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    for target in (run, run / "checkpoints" / "x", run.parent):
        with pytest.raises(FileExistsError, match="would write over or into the training run"):
            export(run, target)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_pipeline_folder_is_replaced_and_dot_works(run, tmp_path, monkeypatch):
    first = export(run, tmp_path / "model")
    export(run, first)  # a pipeline folder: what export writes, replaced without overwrite
    assert (tmp_path / "model" / "model_index.json").is_file()
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    export(run, ".")  # an empty current folder: written in place, no temporary folder inside it
    assert (tmp_path / "here" / "model_index.json").is_file()
    assert not [p for p in (tmp_path / "here").iterdir() if p.name.startswith(".")]
