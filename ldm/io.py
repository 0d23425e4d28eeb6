"""Weight files: safetensors by default, pickle only when asked; strict, shape-checked loading; atomic writes."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# The largest config file (config.json, scheduler_config.json, tokenizer_config.json) read: SD's are under 10 kB, a
# scheduler's trained_betas at the largest num_train_timesteps ~2 MB; a larger one is refused before it is parsed
MAX_CONFIG_BYTES = 16 * 2**20


class WeightsError(ValueError):
    """A weight file or state dict does not fit the model: missing, unexpected or mis-shaped keys, bad files."""


class ConfigError(ValueError):
    """A config key is unknown, missing, out of range or has a value of the wrong type (`ldm.config` raises it; the
    loaders add the file's name)."""


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


def read_json(path: str | Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Read a JSON object (UTF-8), naming the file when it is missing, malformed, or larger than `max_bytes`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
        raise WeightsError(f"{path} is {size / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.0f} MiB such a file "
                           "can need: refusing to parse it")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too-deep nesting or long ints
        raise WeightsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_config(path: str | Path, parse: Callable[[dict[str, Any]], Any]) -> Any:
    """`parse` (a config class's from_diffusers / from_dict) of the JSON object in `path`: an error in the file or in
    a value (the parser names the key) names the file."""
    data = read_json(path, max_bytes=MAX_CONFIG_BYTES)
    try:
        return parse(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from e


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
    config = read_json(folder / "config.json", max_bytes=MAX_CONFIG_BYTES)
    return config, load_state_dict(weights, allow_pickle=allow_pickle)


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
        """Build from `folder/config.json` and load its weights strictly, with errors naming bad keys and shapes.
        The config is checked against the weight file's header before any tensor is read (`build_checked`)."""
        folder = Path(folder)
        weights = find_weights(folder, cls.weight_names, allow_pickle=allow_pickle)
        config = read_config(folder / "config.json", cls.config_class.from_diffusers)
        if weights.suffix == ".safetensors":
            model = build_checked(cls, config, read_header(weights), what=str(folder))
            state_dict = load_state_dict(weights)
        else:  # a pickle has no header: it is read whole (its size bounds what it takes), then checked
            state_dict = load_state_dict(weights, allow_pickle=allow_pickle)
            model = build_checked(cls, config, state_dict, what=str(folder))
        model = give_weights(model, lambda: cls(config), state_dict, what=str(folder))
        return model.to(dtype) if dtype is not None else model


# ------------------------------------------------------------------------------------------------------------------
# Building a module no larger than its weights. A model folder's config says how large a module to build, its weight
# file what the module holds: every size the config asks for is checked against the file's header (keys, shapes,
# dtypes; no tensor read) on the meta device before anything is allocated, so a crafted config cannot make us allocate
# (or spend time on) more than the weights present justify.

_HEADER_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}  # fmt: skip


def read_header(path: str | Path) -> dict[str, torch.Tensor]:
    """What a safetensors file holds, read from its header alone: a meta tensor (no memory) of each key's shape and
    dtype, for `check_state_dict` and `build_checked` to compare with a module before any tensor data is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 - the handle is not iterable
            header = {key: (tuple(s.get_shape()), s.get_dtype()) for key, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    unknown = sorted({dtype for _, dtype in header.values() if dtype not in _HEADER_DTYPES})
    if unknown:
        raise WeightsError(f"{path} holds tensors of dtype(s) {unknown}, which torch cannot load")
    return {key: torch.empty(shape, dtype=_HEADER_DTYPES[dtype], device="meta")
            for key, (shape, dtype) in header.items()}


def check_layer_counts(counts: Iterable[tuple[str, int, str]], keys: Iterable[str], *, what: str) -> None:
    """Name the config key that asks for more layers than the weight file holds. `counts` gives (config key, the
    count it asks for, the state-dict keys that hold one per layer with N, the template's only capital N, for the
    index: "encoder.layers.N."); the file holds as many as distinct N among `keys`. Taken in order and lazily: a count
    that passes bounds the next."""
    keys = list(keys)
    for config_key, asked, template in counts:
        pattern = re.compile(r"(?:^|\.)" + re.escape(template).replace("N", r"(\d+)"))
        held = len({m.group(1) for k in keys if (m := pattern.search(k))})
        if asked > held:
            raise WeightsError(f"{what}: the config's {config_key} asks for {asked} where the weights hold {held} "
                               f"(keys {template.replace('N', '<i>')}*)")


class TensorBudgetError(WeightsError):
    """A module's construction registered more tensors than `tensor_budget` allows."""


@contextmanager
def tensor_budget(limit: int, *, what: str, held: str = "") -> Iterator[None]:
    """Stop a module's construction (in this thread) with WeightsError once it registers more than `limit` parameters
    and buffers (`held`: what the weights hold, for the message): building on the meta device then takes no more
    time and memory than the weights present justify."""
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    thread, count = threading.get_ident(), 0

    def count_one(module: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
        nonlocal count
        if tensor is not None and threading.get_ident() == thread:
            count += 1
            if count > limit:
                raise TensorBudgetError(f"{what}: the config asks for a module of more than {limit} tensors{held} "
                                        "(a layer count or block list too large); stopped building it")

    handles = [register_module_parameter_registration_hook(count_one),
               register_module_buffer_registration_hook(count_one)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_on_meta(build: Callable[[], torch.nn.Module], spec: Mapping[str, torch.Tensor], *, what: str,
                  counts: Iterable[tuple[str, int, str]] = ()) -> torch.nn.Module:
    """`build()` on the meta device (no memory, no random initialisation), stopped once it holds twice the tensors of
    the weights `spec` (`read_header`'s, or the tensors) and a few thousand more (`tensor_budget`: a config asking for
    thousands of layers fails in the time the weights' own layers take to build); the error then names the config
    key that asks for more layers than the weights hold, when one of its layer `counts` does (`check_layer_counts`)."""
    held = f", where the weights hold {len(spec)}"
    try:
        with torch.device("meta"), tensor_budget(2 * len(spec) + 2048, what=what, held=held):
            return build()
    except TensorBudgetError as e:
        over = e
    check_layer_counts(counts, spec, what=what)
    raise over


def build_checked(cls: Callable[[Any], torch.nn.Module], config: Any, spec: Mapping[str, torch.Tensor], *,
                  what: str) -> Any:
    """`cls(config)` on the meta device, checked against the weights `spec` (a file's header, `read_header`, or its
    tensors) before any tensor is read: the module's size (`build_on_meta`; `config.layer_counts()`, when it has them,
    name the config key that asks for too many layers), then every key, shape and dtype kind (`check_state_dict`)."""
    counts = config.layer_counts() if hasattr(config, "layer_counts") else ()
    model = build_on_meta(lambda: cls(config), spec, what=what, counts=counts)
    check_state_dict(model.state_dict(), spec, what=what)
    return model


# Non-persistent buffers (not in the file) a module built for real may hold beyond its weights: up to the weights'
# own size, or this much for small models
_UNCHECKED_BUFFER_BYTES = 64 * 2**20


def give_weights(model: torch.nn.Module, build: Callable[[], torch.nn.Module], state_dict: Mapping[str, torch.Tensor],
                 *, what: str) -> Any:
    """`model` (built on the meta device and checked, `build_checked`) holding exactly `state_dict`'s tensors. A
    module with non-persistent buffers (left on meta) is built again for real by `build()`, when those buffers are
    no larger than the weights (a config cannot ask for gigabytes of tables the file does not hold)."""
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    left = {name: t for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta}
    if left:
        weights = sum(t.numel() * t.element_size() for t in state_dict.values())
        extra = sum(t.numel() * t.element_size() for t in left.values())
        if extra > max(weights, _UNCHECKED_BUFFER_BYTES):
            largest = max(left, key=lambda n: left[n].numel())
            raise WeightsError(f"{what}: the config asks for {extra / 2**20:.0f} MiB of buffers beyond the "
                               f"{weights / 2**20:.0f} MiB of weights ({largest}: {tuple(left[largest].shape)})")
        model = build()
        model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


def build_with_weights(
    cls: Callable[[Any], torch.nn.Module], config: Any, state_dict: Mapping[str, torch.Tensor], *, what: str
) -> Any:
    """`cls(config)` holding exactly `state_dict`: built on the meta device (no random init, no wasted memory),
    checked key by key (errors name the key and both shapes; `build_checked`), then given the file's tensors."""
    model = build_checked(cls, config, state_dict, what=what)
    return give_weights(model, lambda: cls(config), state_dict, what=what)
