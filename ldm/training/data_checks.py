"""What can be wrong with training data, found and reported by name: malformed metadata / CSV files (on loading),
unreadable images and missing captions (counted while training, over every process, by `DataChecks`).

- A metadata.jsonl / metadata.csv / CSV source that cannot be read raises `DataError` naming the file and the problem
  (empty, a header but no rows, line n not JSON, a row wider than its header, not UTF-8), else the loader's own error.
- An unreadable image is skipped (ldm.training.data.collate drops it and names it in the batch's `unreadable`); once
  more than `data.max_unreadable_fraction` of the records drawn are unreadable, judged over at least
  min(MIN_JUDGED, records per epoch) records, the run stops with a `DataError` naming the count and a few of them.
- A caption that is null, missing or blank trains as the empty prompt, is counted (losses.csv `missing_captions`)
  and warned about once naming the record; with `data.missing_caption: error` the run stops naming it instead.
  A caption that is not a string (a number) is used as str(value).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from accelerate.utils import gather_object

logger = logging.getLogger(__name__)

MIN_JUDGED = 256  # records drawn before the unreadable fraction is judged (or one epoch, when it is shorter)
NAMED = 5  # records named in an error


class DataError(ValueError):
    """Training data that cannot be used as configured; the message names the file or records and the problem."""


class ColumnError(DataError, KeyError):
    """The configured image or caption column is not in the data (a KeyError too, as before there was DataError)."""

    __str__ = BaseException.__str__  # the message as given, not KeyError's quoted repr


class Unreadable(NamedTuple):
    """A record whose image could not be read, in place of its sample; `name` says which (see `record_name`)."""

    name: str


def check_columns(columns: list[str] | None, config: Any) -> None:
    """Raise a ColumnError naming the available columns when the image or caption column (of `config`, a
    ldm.training.data.DataConfig, as below) is missing."""
    if columns is None:  # unknown until the first record (some streaming hub datasets)
        return
    for kind, name in (("image_column", config.image_column), ("caption_column", config.caption_column)):
        if name not in columns:
            raise ColumnError(
                f"{kind} {name!r} is not in the dataset from {config.path!r}; available columns: {sorted(columns)}. "
                f"Set DataConfig.{kind} to one of them."
            )


def record_name(value: Any, base: Path | None, index: int) -> str:
    """'record i (path)' for an image column value (datasets.Image's {'path'}, or a path string), else 'record i'."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    if not path:
        return f"record {index}"
    return f"record {index} ({base / path if base is not None and not Path(path).is_absolute() else path})"


def caption_text(value: Any) -> str | None:
    """The caption as trained: str(value) (a number included), or None when it is missing (null, NaN or blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


# ------------------------------------------------------------------------------------------------------ file checks


def source_files(config: Any) -> list[Path]:
    """The local files whose parse problems are named: a CSV source, or an image folder's metadata files."""
    if config.source == "csv":
        return [Path(config.path)]
    if config.source == "imagefolder":
        folder = Path(config.path)
        return sorted([*folder.rglob("metadata.jsonl"), *folder.rglob("metadata.csv")])
    return []


def file_problem(path: Path) -> str | None:
    """What is wrong with a .jsonl / .csv file, or None when this check sees nothing wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    if not text.strip():
        return "the file is empty"
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not JSON ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} is not a JSON object ({{\"file_name\": ..., \"text\": ...}})"
        return None
    if path.suffix != ".csv":
        return None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    width, rows = None, 0
    try:
        for row in reader:
            if not row:
                continue
            if width is None:
                width = len(row)
            elif len(row) > width:
                return f"line {reader.line_num} has {len(row)} fields, the header {width}"
            else:
                rows += 1
    except csv.Error as e:
        return f"CSV parse error at line {reader.line_num}: {e}"
    return "a header but no rows" if rows == 0 else None


def _failure(what: str, files: list[Path], error: BaseException | None) -> str:
    """The message of a source that failed to load: the first file's own problem, else the loader's error."""
    for path in files:
        problem = file_problem(path)
        if problem is not None:
            return f"cannot read {path}: {problem}"
    named = f" ({', '.join(str(p) for p in files[:3])})" if files else ""
    if error is None:
        return f"cannot read {what}{named}: a row has more fields than the header"
    cause = error.__cause__ or error  # datasets' DatasetGenerationError wraps the parser's error
    return f"cannot load {what}{named}: {type(cause).__name__}: {' '.join(str(cause).split())}"


def load_local(what: str, files: list[Path], *args: Any, **kwargs: Any) -> Any:
    """datasets.load_dataset(*args, **kwargs) of local `files`; a failure is a DataError naming the file and problem."""
    try:
        records = datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # pandas, pyarrow, datasets and IndexError alike
        raise DataError(_failure(what, files, e)) from e
    if records.features is not None and any(c.startswith("__index_level_") for c in records.features):
        raise DataError(_failure(what, files, None))  # pandas made the extra leading fields an index
    return records


# --------------------------------------------------------------------------------------------- checks while training


class DataChecks:
    """Counts the records drawn, the unreadable ones and those without a caption over all processes, and stops the
    run (DataError) past data.max_unreadable_fraction or at a missing caption with data.missing_caption = "error".

    `add(batch)` every micro-batch; `update(accelerator)` every optimizer update, on every process (it reduces the
    counts, so all processes decide alike). Unreadable records stop the run once
    unreadable > limit * max(drawn, judge_after), judge_after = min(MIN_JUDGED, records per epoch): the fraction
    over at least judge_after records, decided early when no later record could bring it under the limit.
    """

    def __init__(self, max_unreadable_fraction: float = 0.05, missing_caption: str = "warn",
                 num_samples: int | None = None) -> None:
        self.limit, self.missing_caption = max_unreadable_fraction, missing_caption
        self.judge_after = min(MIN_JUDGED, num_samples or MIN_JUDGED)
        self.drawn = self.unreadable = self.missing = 0  # all processes, the whole run (resumed runs included)
        self.local = [0, 0, 0]  # this process since the last update: drawn, unreadable, missing
        self.names: dict[str, list[str]] = {"unreadable": [], "missing_captions": []}  # this process's first few
        self.warned = False

    @classmethod
    def from_config(cls, data: Any, num_samples: int | None) -> DataChecks:
        """The checks of a DataConfig (None: its defaults) over data of `num_samples` records (None: streamed)."""
        if data is None:
            return cls(num_samples=num_samples)
        return cls(data.max_unreadable_fraction, data.missing_caption, num_samples)

    def add(self, batch: dict[str, Any], readable: int) -> None:
        """Count one collated micro-batch with `readable` samples."""
        skipped = int(batch.get("num_skipped", 0))
        self.local = [self.local[0] + readable + skipped, self.local[1] + skipped,
                      self.local[2] + len(batch.get("missing_captions", ()))]
        for key, names in self.names.items():
            names.extend(batch.get(key, [])[:NAMED - len(names)])

    def _named(self, key: str) -> list[str]:
        """The first NAMED records of `key` over all processes (a collective: every process calls it)."""
        return [n for names in gather_object([self.names[key]]) for n in names][:NAMED]

    def update(self, accelerator: Any) -> None:
        """Add up this update's counts over the processes; raise a DataError or warn (once) as configured."""
        counts = torch.tensor(self.local, dtype=torch.long, device=accelerator.device)
        drawn, unreadable, missing = accelerator.reduce(counts, "sum").tolist()
        self.local = [0, 0, 0]
        self.drawn, self.unreadable, self.missing = (self.drawn + drawn, self.unreadable + unreadable,
                                                     self.missing + missing)
        if self.unreadable > self.limit * max(self.drawn, self.judge_after):
            raise DataError(self._unreadable_message(self._named("unreadable")))
        if missing and (self.missing_caption == "error" or not self.warned):
            first = (self._named("missing_captions") or ["a record"])[0]
            if self.missing_caption == "error":
                raise DataError(f"{first} has no caption (null, missing or blank) and data.missing_caption=error: "
                                "give it a caption, or set data.missing_caption=warn to train it as the empty prompt")
            if accelerator.is_main_process:
                logger.warning("%s has no caption (null, missing or blank): trained as the empty prompt; such records "
                               "are counted in losses.csv's missing_captions (data.missing_caption=error refuses "
                               "them)", first)
            self.warned = True

    def _unreadable_message(self, names: list[str]) -> str:
        u, d, n, limit = self.unreadable, self.drawn, self.judge_after, f"data.max_unreadable_fraction={self.limit:g}"
        if d >= n:
            what = f"{u} of {d} records drawn have unreadable images ({u / d:.1%}), more than {limit}"
        else:  # decided early: however the rest of the first n read, the fraction stays above the limit
            what = f"{u} of the first {d} records drawn have unreadable images: more than {limit} of the first {n}"
        named = f", e.g. {', '.join(names)}" if names else ""
        return f"{what}{named}. Fix or remove them, or raise data.max_unreadable_fraction"

    def state_dict(self) -> dict[str, int]:
        return {"drawn": self.drawn, "unreadable": self.unreadable, "missing_captions": self.missing}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.drawn, self.unreadable, self.missing = state["drawn"], state["unreadable"], state["missing_captions"]
