"""Captioned-image data for training: Hugging Face `datasets` sources, the resize/crop/flip transform, a resumable order.

Sources (`DataConfig.source`): "imagefolder" (a folder of images with captions in metadata.jsonl/metadata.csv, read by
`load_dataset("imagefolder")`), "csv" (a CSV of image paths, relative to the CSV's folder or absolute, and captions),
"hub" (`load_dataset(name)`); `streaming=True` reads any of them as a `datasets.IterableDataset`.

Unreadable images become `Unreadable` samples; `collate` drops them, reporting `num_skipped` and their names per batch,
so a batch always draws exactly `batch_size` records and the data position is plain arithmetic. Malformed metadata,
unreadable images and missing captions are checked by ldm.training.data_checks.

Resuming, with or without accelerate (use `DataLoaderConfiguration(dispatch_batches=False)`: batches hold strings)::

    loader, position = build_dataloader(cfg, batch_size, num_processes=accelerator.num_processes)
    loader = accelerator.prepare(loader)
    position.load_state_dict(ckpt["data"])           # when resuming
    for epoch in range(position.epoch, num_epochs):
        loader.set_epoch(epoch)                      # always: accelerate calls set_epoch with its own counter
        for step, batch in enumerate(loader):
            ...
            ckpt["data"] = position.state_dict(samples_consumed(step + 1, batch_size, accelerator.num_processes))

Every process draws the same seeded order; accelerate gives process p the global batches p, p+P, ... (map-style:
BatchSamplerShard; streaming: IterableDatasetShard, fed in whole global batches by `StreamingCaptionedImages`), so
after s steps the first s * batch_size * P records of the epoch are consumed on all processes together, whatever
`num_workers` is. Restore with the same seed and data; the batch size and number of processes may change only if
the saved index is a multiple of the new global batch. A streamed source has no known length, so a position saved at
the very end of an epoch resumes into an empty remainder of that epoch and then goes on with the next one.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from ldm.training import data_checks as checks

logger = logging.getLogger(__name__)

Sample = dict[str, Any] | checks.Unreadable | None


class HubUnavailableError(ConnectionError):
    """A hub dataset was requested but the Hugging Face Hub cannot be reached (offline, no network)."""


@dataclass
class DataConfig:
    """Where the captioned images come from and how they become training tensors."""

    source: Literal["imagefolder", "csv", "hub"] = "imagefolder"
    path: str = ""  # image folder, CSV file, or hub dataset name
    hub_config: str | None = None  # second argument of load_dataset for hub datasets with several configs
    split: str = "train"  # ignored for "csv" (a CSV file has one split)
    image_column: str = "image"
    caption_column: str = "text"
    resolution: int = 64
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False
    shuffle: bool = True
    streaming: bool = False
    shuffle_buffer: int = 1000  # streaming shuffle buffer (datasets' IterableDataset.shuffle)
    max_samples: int | None = None  # keep the first max_samples records of the source
    seed: int = 0
    cache_dir: str | None = None  # datasets cache; None = datasets' default
    max_unreadable_fraction: float = 0.05  # more unreadable images than this stops training (ldm.training.data_checks)
    missing_caption: Literal["warn", "error"] = "warn"  # null/blank caption: count, warn once, train as ""; or stop

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("DataConfig.path is empty: give an image folder, a CSV file or a hub dataset name")
        if self.resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {self.resolution}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, got {self.max_samples}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not 0.0 <= self.max_unreadable_fraction <= 1.0:
            raise ValueError(f"max_unreadable_fraction must lie in [0, 1], got {self.max_unreadable_fraction}")


# ---------------------------------------------------------------------------------------------------------- sources


def load_records(config: DataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, Path | None]:
    """The raw records (image column undecoded, captions as strings) and the folder relative image paths start from."""
    base: Path | None = None
    kwargs: dict[str, Any] = {"streaming": config.streaming, "cache_dir": config.cache_dir}
    if config.source == "imagefolder":
        folder = Path(config.path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {folder} (expected a folder of images with metadata.jsonl or metadata.csv "
                "holding a file_name column and a caption column; to make the synthetic shapes data there: python -c "
                f"\"from ldm.shapes.dataset import export_imagefolder; export_imagefolder('{folder}', 256, 'train', 0, "
                "size=32)\")"
            )
        records = checks.load_local(f"image folder {folder}", checks.source_files(config), "imagefolder",
                                    data_dir=str(folder), split=config.split, **kwargs)
    elif config.source == "csv":
        csv = Path(config.path)
        if not csv.is_file():
            raise FileNotFoundError(f"CSV file not found: {csv} (expected columns for image paths and captions)")
        base = csv.parent.resolve()
        records = checks.load_local(f"CSV file {csv}", [csv], "csv", data_files=str(csv), split="train", **kwargs)
    elif config.source == "hub":
        try:
            records = datasets.load_dataset(config.path, config.hub_config, split=config.split, **kwargs)
        except ConnectionError as e:
            raise HubUnavailableError(
                f"cannot load dataset {config.path!r}: the Hugging Face Hub is unreachable ({e}). Offline, put the "
                "images in a local folder with a metadata.jsonl of {\"file_name\": ..., \"text\": ...} lines and use "
                "DataConfig(source='imagefolder', path=<folder>), or a CSV with source='csv'."
            ) from e
    else:
        raise ValueError(f"unknown data source {config.source!r}; valid: ['imagefolder', 'csv', 'hub']")
    checks.check_columns(list(records.features) if records.features is not None else None, config)
    if records.features is not None and isinstance(records.features[config.image_column], datasets.Image):
        records = records.cast_column(config.image_column, datasets.Image(decode=False))  # we decode (and skip)
    if config.max_samples is not None:
        if config.streaming:
            records = records.take(config.max_samples)
        else:
            records = records.select(range(min(config.max_samples, len(records))))
    return records, base


def open_image(value: Any, base: Path | None = None) -> Image.Image:
    """Open an image column value: {'bytes', 'path'} from datasets.Image, a path string, or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise ValueError(f"not an image reference: {value!r}")
    path = Path(value)
    if base is not None and not path.is_absolute():
        path = base / path
    return Image.open(path)


# -------------------------------------------------------------------------------------------------------- transform


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Bilinear resize so the shorter side is `resolution` (the longer side truncated, as torchvision's Resize)."""
    w, h = image.size
    if min(w, h) == resolution:
        return image
    if w <= h:
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    return image.resize(size, Image.Resampling.BILINEAR)


def crop_box(width: int, height: int, resolution: int, generator: torch.Generator | None) -> tuple[int, int]:
    """(top, left) of a resolution x resolution crop: centred (torchvision's rounding) or uniform with `generator`."""
    if width < resolution or height < resolution:
        raise ValueError(f"image {width}x{height} is smaller than the crop {resolution}x{resolution}")
    if generator is None:
        return int(round((height - resolution) / 2.0)), int(round((width - resolution) / 2.0))
    top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    return top, left


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB (H, W, 3) -> float32 (3, H, W) in [-1, 1]: x = u / 127.5 - 1."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator fixed by (seed, epoch, index): the same augmentation whatever the worker, process or resume."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def preprocess(image: Image.Image, config: DataConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """RGB, shorter side -> resolution, center/random crop, random horizontal flip: float (3, res, res) in [-1, 1]."""
    if config.crop == "random" or config.random_flip:
        if generator is None:
            raise ValueError("random crop or flip needs a generator (see sample_generator)")
    image = resize_shorter_side(image.convert("RGB"), config.resolution)
    r = config.resolution
    top, left = crop_box(image.width, image.height, r, generator if config.crop == "random" else None)
    image = image.crop((left, top, left + r, top + r))
    if config.random_flip and bool(torch.rand((), generator=generator) < 0.5):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)  # (3, r, r)


class _Decoder:
    """Record -> {'pixel_values', 'caption', 'index', 'uncaptioned' (its name when the caption is missing: trained
    as "")}, or Unreadable (counted, logged) when the image cannot be read."""

    def __init__(self, config: DataConfig, base: Path | None) -> None:
        self.config, self.base, self.num_skipped = config, base, 0

    def __call__(self, record: dict[str, Any], epoch: int, index: int, *, with_image: bool = True) -> Sample:
        """with_image=False: caption and index only, the image is not opened (its latent is cached: CaptionedImages)."""
        checks.check_columns(list(record), self.config)
        caption = checks.caption_text(record[self.config.caption_column])
        name = checks.record_name(record[self.config.image_column], self.base, index)
        sample = {"caption": caption or "", "index": index, "uncaptioned": None if caption is not None else name}
        if not with_image:
            return sample
        try:
            with open_image(record[self.config.image_column], self.base) as image:
                image.load()
                gen = sample_generator(self.config.seed, epoch, index)
                pixels = preprocess(image, self.config, gen)
        except Exception as e:  # noqa: BLE001 -- any unreadable image is skipped, never fatal
            self.num_skipped += 1
            logger.warning("skipping unreadable image (%s): %s: %s", name, type(e).__name__, e)
            return checks.Unreadable(name)
        return {"pixel_values": pixels, **sample}


def collate(samples: list[Sample]) -> dict[str, Any]:
    """Stack the readable samples: pixel_values (B, 3, H, W), captions list[str], indices (B,), num_skipped (),
    unreadable and missing_captions (names of the records). pixel_values is left out when the samples carry no image
    (CaptionedImages.images = False).

    indices: the record index (map-style), or the position in the epoch's stream (streaming; the record index when
    shuffle=False). num_skipped: unreadable records this batch drew (sum it, e.g. with accelerator.reduce, to log).
    """
    kept = [s for s in samples if isinstance(s, dict)]
    skips = {"num_skipped": torch.tensor(len(samples) - len(kept)),
             "unreadable": [s.name for s in samples if isinstance(s, checks.Unreadable)],
             "missing_captions": [s["uncaptioned"] for s in kept if s.get("uncaptioned") is not None]}
    if not kept:
        return {"pixel_values": torch.empty(0, 3, 0, 0), "captions": [], "indices": torch.empty(0, dtype=torch.long),
                **skips}
    with_pixels = ["pixel_values" in s for s in kept]
    if any(with_pixels) and not all(with_pixels):
        raise ValueError("collate: some samples carry pixel_values and some do not")
    batch = {"pixel_values": torch.stack([s["pixel_values"] for s in kept])} if all(with_pixels) else {}
    return {
        **batch,
        "captions": [s["caption"] for s in kept],
        "indices": torch.tensor([s["index"] for s in kept], dtype=torch.long),
        **skips,
    }


# ---------------------------------------------------------------------------------------------- order and position


def samples_consumed(steps: int, batch_size: int, num_processes: int = 1) -> int:
    """Records of the epoch consumed by all processes after `steps` steps of `batch_size` each (split_batches=False)."""
    return steps * batch_size * num_processes


class _Position:
    """Epoch and start index within it; `set_epoch` to a new epoch starts it at 0, a restored one keeps its start."""

    def __init__(self, seed: int, num_samples: int | None) -> None:
        self.seed, self.num_samples, self.epoch, self.start = seed, num_samples, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """The position after `consumed` more records of this epoch (see `samples_consumed`), for a checkpoint."""
        epoch, index = self.epoch, self.start + consumed
        if self.num_samples is not None and index >= self.num_samples:
            epoch, index = epoch + 1, 0
        return {"epoch": epoch, "index": index, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_samples"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state.get(key)}, this data has "
                                 f"{getattr(self, key)}: resuming would not continue the same order")
        self.epoch, self.start = int(state["epoch"]), int(state["index"])


class ResumableSampler(_Position, Sampler[tuple[int, int]]):
    """Yields (epoch, index) over a seeded permutation per epoch (torch.randperm, seed + epoch), from `start` on."""

    def __init__(self, num_samples: int, *, shuffle: bool = True, seed: int = 0) -> None:
        _Position.__init__(self, seed, num_samples)
        self.shuffle = shuffle

    def order(self, epoch: int) -> list[int]:
        """The record indices of `epoch` in the order they are drawn."""
        if not self.shuffle:
            return list(range(self.num_samples))
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self):
        epoch = self.epoch
        return ((epoch, i) for i in self.order(epoch)[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class CaptionedImages(torch.utils.data.Dataset):
    """Map-style captioned images; index with (epoch, i) from ResumableSampler (or a plain i, epoch 0).

    `images = False` stops opening images: samples are then caption and index only. A trainer that caches every
    record's latent sets it (ldm.training.unet with run.cache_latents); DataLoader workers see the change at their next start.
    """

    def __init__(self, records: datasets.Dataset, config: DataConfig, base: Path | None = None) -> None:
        self.records, self.decode = records, _Decoder(config, base)
        self.images = True

    @property
    def num_skipped(self) -> int:
        """Unreadable images met in this process (workers count their own: use the batches' num_skipped)."""
        return self.decode.num_skipped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} records")
        return self.decode(self.records[index], epoch, index, with_image=self.images)


class StreamingCaptionedImages(_Position, torch.utils.data.IterableDataset):
    """Streamed captioned images in a seeded order (datasets' buffer shuffle, seed + epoch), resumable mid-epoch.

    DataLoader worker w decodes the records of global batches w, w+W, ... (`global_batch_size` records each), so the
    DataLoader's round-robin over workers returns the single-process order for any number of workers.
    """

    def __init__(self, records: datasets.IterableDataset, config: DataConfig, base: Path | None = None, *,
                 global_batch_size: int = 1) -> None:
        _Position.__init__(self, config.seed, None)
        self.records, self.config, self.decode = records, config, _Decoder(config, base)
        self.global_batch_size = global_batch_size

    @property
    def num_skipped(self) -> int:
        """Unreadable images met in this process (workers count their own: use the batches' num_skipped)."""
        return self.decode.num_skipped

    def _stream(self, epoch: int):
        records = self.records
        if self.config.shuffle:
            records = records.shuffle(seed=self.config.seed, buffer_size=self.config.shuffle_buffer)
        records.set_epoch(epoch)
        for batch in records.iter(batch_size=64):  # .iter reads every shard in every worker (no worker split)
            for i in range(len(next(iter(batch.values())))):
                yield {k: v[i] for k, v in batch.items()}

    def __iter__(self):
        epoch, start = self.epoch, self.start
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, record in enumerate(islice(self._stream(epoch), start, None)):
            if (j // self.global_batch_size) % num_workers == worker:
                yield self.decode(record, epoch, start + j)


def build_dataloader(
    config: DataConfig,
    batch_size: int,
    *,
    num_workers: int = 0,
    num_processes: int = 1,
    drop_last: bool = False,
) -> tuple[DataLoader, ResumableSampler | StreamingCaptionedImages]:
    """A DataLoader of `collate` batches and the object that holds its position (set_epoch/state_dict/load_state_dict).

    Pass the number of processes accelerate will shard over (`accelerator.num_processes`), so streaming workers
    hand out whole global batches.
    """
    if batch_size < 1 or num_processes < 1:
        raise ValueError(f"batch_size and num_processes must be >= 1, got {batch_size} and {num_processes}")
    records, base = load_records(config)
    common = {"batch_size": batch_size, "num_workers": num_workers, "collate_fn": collate, "drop_last": drop_last}
    if config.streaming:
        stream = StreamingCaptionedImages(records, config, base, global_batch_size=batch_size * num_processes)
        return DataLoader(stream, **common), stream
    if len(records) == 0:
        raise ValueError(f"no records in {config.path!r} (split {config.split!r})")
    sampler = ResumableSampler(len(records), shuffle=config.shuffle, seed=config.seed)
    return DataLoader(CaptionedImages(records, config, base), sampler=sampler, **common), sampler

