"""Weight files: safetensors by default, pickle only when asked; strict, shape-checked loading; atomic writes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class WeightsError(ValueError):
    """A weight file or state dict does not fit the model: missing, unexpected or mis-shaped keys, bad files."""


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors`; pickle files (`.ckpt`, `.bin`, `.pt`) only with `allow_pickle=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise WeightsError(
                f"{path} is a pickle file ({suffix}): loading it can run arbitrary code. Convert it to .safetensors, "
                "or pass allow_pickle=True (CLI: --allow-pickle) if you trust its source."
            )
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
            raise WeightsError(f"could not read pickle checkpoint {path}: {e}") from e
        if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
            data = data["state_dict"]
        if not isinstance(data, Mapping):
            raise WeightsError(f"{path} does not hold a state dict (got {type(data).__name__})")
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if suffix != ".safetensors":
        raise WeightsError(f"{path}: unknown weight format {suffix!r}; expected .safetensors (or {PICKLE_SUFFIXES})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (`_atomic_write`)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_json(data: Any, path: str | Path) -> None:
    """Write JSON atomically."""
    write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", path)


def write_bytes(data: bytes, path: str | Path) -> None:
    """Write a file atomically (`_atomic_write`)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """`write(tmp)` to a temporary file in the same folder, give it a new file's mode (0666 less the umask, not
    mkstemp's 0600), then `os.replace` it onto `path`: the file appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(text: str, path: str | Path) -> None:
    """Write a UTF-8 text file atomically."""
    write_bytes(text.encode("utf-8"), path)


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object, naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object")
    return data


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux/glibc
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a file system without exchange
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


@contextmanager
def atomic_directory(path: str | Path, *, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, on error it is removed.

    Readers never see a half-written folder: the old folder stays until the new one is complete, and on Linux the
    two are swapped in one step (`exchange_paths`), so `path` is never missing either. A `path` that holds files is
    replaced only when `may_replace(path)` says it is what the caller writes (e.g. a pipeline folder; a caller's
    overwrite=True), never a user's folder by accident: FileExistsError names it and a few of its entries.
    """
    path = Path(path).resolve()  # "." and relative paths: the temporary folder goes beside the folder, not inside
    check_replaceable(path, may_replace)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # the writer's pid in the name: a folder left by a killed writer is recognisable, and removed by the next one
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a model folder should be as readable as any other
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists() and exchange_paths(tmp, path):  # one atomic swap: `path` is never missing
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        return
    old = None
    if path.exists():  # no atomic swap on this system: a short window without `path`
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary folders `atomic_directory(path)` writers left beside `path` when killed (named
    `.<name>.<pid>.<8 chars>.tmp`, the pid no longer running); warn naming them. Another writer's live one stays."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[a-z0-9_]{{8}}\.tmp$")
    stale = []
    if path.parent.is_dir():
        for entry in path.parent.iterdir():
            m = pattern.match(entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                stale.append(entry)
    if stale:
        warnings.warn(f"removed {len(stale)} temporary folder(s) a killed writer left beside {path}: "
                      + ", ".join(p.name for p in stale), stacklevel=3)
    return stale


def check_replaceable(path: Path, may_replace: Callable[[Path], bool] | None) -> None:
    """Refuse to replace `path` when it is a file, or a folder holding files that `may_replace` does not accept."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder: refusing to replace it")
    if path.is_dir() and any(path.iterdir()) and not (may_replace is not None and may_replace(path)):
        entries = sorted(p.name for p in path.iterdir())
        raise FileExistsError(f"{path} already holds files this did not write ({', '.join(entries[:4])}"
                              f"{', ...' if len(entries) > 4 else ''}): refusing to replace it; choose another "
                              "folder, or pass overwrite=True (--overwrite) to replace it whole")


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], *, what: str
) -> None:
    """Raise WeightsError naming every missing, unexpected or mis-shaped key (with both shapes), and every tensor
    whose kind is not the model's (integer or boolean weights where it holds floating ones, or the reverse)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k}: model {tuple(expected[k].shape)} vs file {tuple(given[k].shape)}"
        for k in expected
        if k in given and tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    dtypes = [
        f"{k}: {str(given[k].dtype).removeprefix('torch.')} where the model holds "
        f"{str(expected[k].dtype).removeprefix('torch.')}"
        for k in expected
        if k in given and expected[k].is_floating_point() != given[k].is_floating_point()
    ]
    problems = []
    if dtypes:
        problems.append(f"weights of the wrong kind (integer or boolean for floating, or the reverse) {_few(dtypes)}")
    if missing:
        problems.append(f"missing key(s) {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s) {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise WeightsError(f"{what}: " + "; ".join(problems))


def load_weights(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Load `state_dict` into `module` strictly after checking every key and shape (errors name the key)."""
    expected = module.state_dict()
    check_state_dict(expected, state_dict, what=what)
    module.load_state_dict(dict(state_dict), strict=True)


def _few(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


def find_weights(folder: str | Path, names: tuple[str, ...], *, allow_pickle: bool = False) -> Path:
    """The first existing weight file of `names` in `folder` (safetensors names first), with clear errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    for name in names:
        if (folder / name).is_file():
            path = folder / name
            if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
                raise WeightsError(
                    f"{path} is a pickle file and no safetensors file is present: loading it can run arbitrary code. "
                    "Pass allow_pickle=True (CLI: --allow-pickle) if you trust its source."
                )
            return path
    raise FileNotFoundError(f"no weight file in {folder}: expected one of {list(names)}")


def save_model_folder(
    folder: str | Path, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], weights_name: str
) -> None:
    """Write `config.json` and a safetensors weight file into `folder` (each file atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(state_dict, folder / weights_name, metadata={"format": "pt"})
    write_json(dict(config), folder / "config.json")


def load_model_folder(
    folder: str | Path, weight_names: tuple[str, ...], *, allow_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read `config.json` and the first weight file found among `weight_names` in `folder`."""
    folder = Path(folder)
    weights = find_weights(folder, weight_names, allow_pickle=allow_pickle)
    return read_json(folder / "config.json"), load_state_dict(weights, allow_pickle=allow_pickle)


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class PretrainedMixin:
    """`from_pretrained(folder)` / `save_pretrained(folder)` for a module built from a config with
    `from_diffusers(dict)` / `to_diffusers()`: a diffusers-format `config.json` + safetensors weights."""

    config_class: Any
    weight_names: tuple[str, ...] = DIFFUSERS_WEIGHTS

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `config.json` and safetensors weights into `folder` (atomic per file)."""
        module: torch.nn.Module = self  # type: ignore[assignment]
        save_model_folder(folder, self.config.to_diffusers(), module.state_dict(), self.weight_names[0])  # type: ignore[attr-defined]

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
    ) -> Any:
        """Build from `folder/config.json` and load its weights strictly, with errors naming bad keys and shapes."""
        config_dict, state_dict = load_model_folder(folder, cls.weight_names, allow_pickle=allow_pickle)
        model = build_with_weights(cls, cls.config_class.from_diffusers(config_dict), state_dict, what=str(folder))
        return model.to(dtype) if dtype is not None else model


def build_with_weights(
    cls: Callable[[Any], torch.nn.Module], config: Any, state_dict: Mapping[str, torch.Tensor], *, what: str
) -> Any:
    """`cls(config)` holding exactly `state_dict`: built on the meta device (no random init, no wasted memory),
    checked key by key (errors name the key and both shapes), then given the file's tensors."""
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(model.state_dict(), state_dict, what=what)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # non-persistent buffers: build for real
        model = cls(config)
        model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()
