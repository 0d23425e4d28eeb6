"""Image files the CLI writes: numbered output paths, atomic saves in the format the suffix names, grids. Light to
import (PIL is loaded when an image is saved), so `ldm --help` stays instant."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def output_paths(out: str | Path, n: int) -> list[Path]:
    """out.png for one image; out.png, out-1.png, ..., out-(n-1).png for n images."""
    return [output_path(out, i) for i in range(n)]


def output_path(out: str | Path, i: int) -> Path:
    """Where image i of a run goes: out.png for the first, out-i.png for the others."""
    out = Path(out)
    return out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}")


def save_image_atomic(image: Any, path: str | Path) -> None:
    """Write a PIL image to a temporary file beside `path`, then `os.replace`: readers never see a partial file."""
    import io

    from ldm.io import write_bytes

    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format(path))
    write_bytes(buffer.getvalue(), path)


def image_format(path: Path) -> str:
    """The PIL format the suffix of `path` names, or ValueError naming the suffix."""
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write images with suffix {path.suffix!r} ({path.name}): use .png (or .jpg, .webp)")
    return fmt


def image_grid(images: Sequence[Any], cols: int | None = None) -> Any:
    """Tile equally sized PIL images row by row into one image (cols defaults to ceil(sqrt(n)))."""
    from PIL import Image

    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
