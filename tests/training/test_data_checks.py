"""Data problems (issue 31): unreadable images judged against data.max_unreadable_fraction, missing captions counted,
warned or refused, malformed metadata named by file, and the losses.csv rows of a resumed run.

Broken datasets are copies of the `shapes` fixture (16 captioned 32 px images) with files corrupted in tmp_path.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from ldm.training.data import DataConfig, collate, load_records
from ldm.training.data_checks import ColumnError, DataChecks, DataError, Unreadable, caption_text
from ldm.training.unet import train
from pipelines.cli import main
from tests._helpers import ROOT, tiny_config, tiny_overrides

NOT_AN_IMAGE = b"\x89PNG\r\n\x1a\n not an image"


def copy_data(shapes: Path, tmp_path: Path, *, bad: tuple[int, ...] = ()) -> Path:
    """A copy of the shapes folder with images `bad` (by number) corrupted."""
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    for i in bad:
        (data / f"{i:06d}.png").write_bytes(NOT_AN_IMAGE)
    return data


def set_captions(data: Path, captions: dict[int, object]) -> None:
    """Replace the captions of records `captions` (by line) in metadata.jsonl (None: null; "drop": no key)."""
    lines = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for i, text in captions.items():
        if text == "drop":
            del lines[i]["text"]
        else:
            lines[i]["text"] = text
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "losses.csv").open() as f:
        return list(csv.DictReader(f))


def left_behind(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


class OneProcess:
    """What DataChecks uses of an Accelerator, for one process."""

    device = torch.device("cpu")
    is_main_process = True

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor


def batch(readable: int, unreadable: list[str], missing: list[str] = ()) -> dict:
    return {"captions": ["c"] * readable, "num_skipped": torch.tensor(len(unreadable)), "unreadable": unreadable,
            "missing_captions": list(missing)}


# ------------------------------------------------------------------------------------------------- unreadable images


def test_the_fraction_is_judged_over_min_256_or_one_epoch():
    acc = OneProcess()
    big = DataChecks(0.05, num_samples=10_000)  # judged over >= 256 records: 0.05 * 256 = 12.8
    big.add(batch(3, ["record 0 (a.png)"]), 3)
    big.update(acc)  # 1 of 4: not on the first bad image of a big dataset
    for k in range(3):
        big.add(batch(0, [f"record {i} ({i}.png)" for i in range(4 * k + 1, 4 * k + 5)]), 0)
        if k < 2:
            big.update(acc)
    with pytest.raises(DataError, match=r"^13 of the first 16 records drawn have unreadable images: more than "
                       r"data.max_unreadable_fraction=0.05 of the first 256, e\.g\. record 0 \(a\.png\), "
                       r"record 1 \(1\.png\), record 2 \(2\.png\), record 3 \(3\.png\), record 4 \(4\.png\)\. "):
        big.update(acc)  # 13 > 12.8: no later record can bring the first 256 under the limit
    later = DataChecks(0.05, num_samples=10_000)
    later.load_state_dict({"drawn": 296, "unreadable": 15, "missing_captions": 0})  # as a resumed run
    later.add(batch(4, []), 4)
    later.update(acc)  # 15 of 300 = 5%: not more
    later.add(batch(3, ["record 7 (x.png)"]), 3)
    with pytest.raises(DataError, match=r"^16 of 304 records drawn have unreadable images \(5\.3%\), more than "
                       r"data.max_unreadable_fraction=0.05, e\.g\. record 7 \(x\.png\)"):
        later.update(acc)
    assert later.state_dict() == {"drawn": 304, "unreadable": 16, "missing_captions": 0}
    small = DataChecks(0.1, num_samples=16)  # an epoch shorter than 256 is judged whole: 0.1 * 16 = 1.6
    small.add(batch(3, ["record 0 (a.png)"]), 3)
    small.update(acc)
    small.add(batch(3, ["record 5 (b.png)"]), 3)
    with pytest.raises(DataError, match=r"^2 of the first 8 records drawn .* of the first 16"):
        small.update(acc)
    with pytest.raises(ValueError, match="max_unreadable_fraction must lie in"):
        DataConfig(path="x", max_unreadable_fraction=1.5)


def test_all_unreadable_data_stops_at_the_first_update_leaving_nothing(shapes, tmp_path):
    data = copy_data(shapes, tmp_path, bad=tuple(range(16)))
    out = tmp_path / "run"
    names = r"record \d+ \([^)]*/0000\d\d\.png\)"
    with pytest.raises(DataError, match=rf"^4 of the first 4 records drawn have unreadable images: more than "
                       rf"data.max_unreadable_fraction=0.05 of the first 16, e\.g\. ({names}, ){{3}}{names}\. "):
        train(tiny_config(data, out))  # batch 2 x 2 micro-batches: the first update draws 4 records
    assert left_behind(out) == []  # no checkpoint, no frozen/: a retry is a fresh run


def test_one_bad_image_trains_and_warns_under_the_limit_and_stops_over_it(shapes, tmp_path, caplog):
    data = copy_data(shapes, tmp_path, bad=(0,))  # unshuffled, the first update draws records 0-3
    with caplog.at_level(logging.WARNING):
        train(tiny_config(data, tmp_path / "a", "run.max_steps=1", "data.shuffle=false",
                          "data.max_unreadable_fraction=0.1"))  # 1 of 16 is under 10%
    assert [float(r["skipped"]) for r in rows(tmp_path / "a")] == [1.0]
    assert (tmp_path / "a/checkpoints/step-00000001/meta.json").is_file()
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 1 and "000000.png" in warned[0]
    # 1 of 16 is 6.25%, over the default 5%: the run stops at the update that draws it
    with pytest.raises(DataError, match=r"^1 of the first 4 records drawn .*e\.g\. record 0 \([^)]*/000000\.png\)"):
        train(tiny_config(data, tmp_path / "b", "data.shuffle=false"))
    assert left_behind(tmp_path / "b") == []


# --------------------------------------------------------------------------------------------------- missing captions


def test_caption_text_and_collate_name_the_records():
    assert [caption_text(v) for v in (None, float("nan"), "", "  \t", 7, 2.5, " a cat ")] == \
        [None, None, None, None, "7", "2.5", " a cat "]
    out = collate([Unreadable("record 0 (a.png)"), None,
                   {"caption": "", "index": 2, "uncaptioned": "record 2 (c.png)"},
                   {"caption": "a dog", "index": 3, "uncaptioned": None}])
    assert out["captions"] == ["", "a dog"] and int(out["num_skipped"]) == 2
    assert out["unreadable"] == ["record 0 (a.png)"] and out["missing_captions"] == ["record 2 (c.png)"]


def test_missing_captions_are_counted_warned_once_or_refused(shapes, tmp_path, caplog):
    data = copy_data(shapes, tmp_path)
    set_captions(data, {1: None, 2: "   ", 3: "drop"})
    one_by_one = ("data.shuffle=false", "optim.gradient_accumulation_steps=1")  # update 1: records 0, 1; 2: 2, 3
    with caplog.at_level(logging.WARNING):
        train(tiny_config(data, tmp_path / "a", "run.max_steps=2", *one_by_one))
    assert [float(r["missing_captions"]) for r in rows(tmp_path / "a")] == [1.0, 2.0]
    warned = [r.getMessage() for r in caplog.records if "has no caption" in r.getMessage()]
    assert len(warned) == 1 and "record 1 (" in warned[0] and "000001.png" in warned[0], warned
    with pytest.raises(DataError, match=r"^record 1 \([^)]*/000001\.png\) has no caption .*missing_caption=error"):
        train(tiny_config(data, tmp_path / "b", *one_by_one, "data.missing_caption=error"))
    assert left_behind(tmp_path / "b") == []


# ------------------------------------------------------------------------------------------------ malformed metadata


def _imagefolder(shapes: Path, tmp_path: Path, name: str, text: str) -> tuple[Path, Path]:
    data = copy_data(shapes, tmp_path)
    (data / "metadata.jsonl").unlink()
    (data / name).write_text(text)
    return data, data / name


def _jsonl_bad_line(shapes, tmp_path):
    data = copy_data(shapes, tmp_path)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[2] = '{"file_name": "000002.png", "text": '
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return data, data / "metadata.jsonl"


def _csv_source(shapes, tmp_path, text):
    data = copy_data(shapes, tmp_path)
    (data / "list.csv").write_text(text)
    return data / "list.csv", data / "list.csv"


BROKEN = {  # name: (make(shapes, tmp_path) -> (data.path, the file to name), extra overrides, the problem named)
    "empty metadata.csv": (lambda s, t: _imagefolder(s, t, "metadata.csv", ""), (), "the file is empty"),
    "header-only metadata.csv": (lambda s, t: _imagefolder(s, t, "metadata.csv", "file_name,text\n"), (),
                                 "a header but no rows"),
    "empty metadata.jsonl": (lambda s, t: _imagefolder(s, t, "metadata.jsonl", "\n"), (), "the file is empty"),
    "malformed metadata.jsonl": (_jsonl_bad_line, (), r"line 3 is not JSON \(Expecting value"),
    "metadata.jsonl line not an object": (lambda s, t: _imagefolder(s, t, "metadata.jsonl", '[1, 2]\n'), (),
                                          "line 1 is not a JSON object"),
    "CSV row wider than its header": (lambda s, t: _csv_source(s, t, "image,text\n000000.png,a,b,c\n000001.png,d\n"),
                                      ("data.source=csv",), "line 2 has 4 fields, the header 2"),
    "CSV unterminated quote": (lambda s, t: _csv_source(s, t, 'image,text\n"000000.png,a\n000001.png,b\n'),
                               ("data.source=csv",), "CSV parse error at line 3: unexpected end of data"),
    "empty CSV source": (lambda s, t: _csv_source(s, t, ""), ("data.source=csv",), "the file is empty"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_metadata_names_the_file_and_the_problem(shapes, tmp_path, case):
    make, extra, problem = BROKEN[case]
    path, named = make(shapes, tmp_path)
    source = "csv" if "data.source=csv" in extra else "imagefolder"
    config = DataConfig(path=str(path), source=source, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"^cannot read {named}: {problem}"):
        load_records(config)


@pytest.mark.parametrize("case", ["empty metadata.csv", "malformed metadata.jsonl", "CSV row wider than its header"])
def test_ldm_train_prints_one_error_line_for_bad_data(shapes, tmp_path, capsys, case):
    make, extra, _ = BROKEN[case]
    path, named = make(shapes, tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--config", str(ROOT / "ldm/configs/train-tiny.yaml"), *tiny_overrides(path, out, *extra)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ldm: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert f"cannot read {named}: " in errors[0], errors
    assert left_behind(out) == []


def test_a_missing_column_is_a_data_error_and_a_key_error(shapes, tmp_path):
    with pytest.raises(ColumnError, match=r"^caption_column 'caption' is not in") as info:
        load_records(DataConfig(path=str(shapes), caption_column="caption", cache_dir=str(tmp_path / "cache")))
    assert isinstance(info.value, KeyError) and isinstance(info.value, DataError)


def test_a_source_without_records_stops_instead_of_looping(shapes, tmp_path):
    csv_file = tmp_path / "list.csv"
    csv_file.write_text("image,text\n")  # streamed, a header-only CSV loads as an empty stream
    with pytest.raises(DataError, match="no records to train on"):
        train(tiny_config(csv_file, tmp_path / "run", "data.source=csv", "data.streaming=true"))


# ----------------------------------------------------------------------------------------------- losses.csv on resume


def test_a_resumed_run_writes_the_same_losses_csv_rows(shapes, tmp_path):
    """Rows every 2 updates, a checkpoint at 3: the row at 4 averages updates 3 and 4 in both runs (the partial window
    of update 3 travels in the checkpoint's meta.json)."""
    log = ("run.log_every=2", "run.checkpoint_every=3", "run.batch_size=1")
    train(tiny_config(shapes, tmp_path / "a", *log))
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a/checkpoints/step-00000003", b / "checkpoints/step-00000003")
    shutil.copy(tmp_path / "a/losses.csv", b / "losses.csv")  # the resumed run keeps its rows up to step 3
    train(tiny_config(shapes, b, *log, "run.resume=latest"))
    a_rows, b_rows = rows(tmp_path / "a"), rows(b)
    assert [r["step"] for r in a_rows] == ["2", "4", "6"]
    for r in a_rows + b_rows:
        del r["images_per_s"]  # a wall-clock rate
    assert a_rows == b_rows
