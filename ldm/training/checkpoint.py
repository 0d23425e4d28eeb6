"""Training checkpoints: atomic folders holding everything a run needs to continue exactly where it stopped.

A checkpoint is `<output_dir>/checkpoints/step-00001000/`:

    <name>.safetensors        trained weights of each part (e.g. unet), safetensors
    <name>.ema.safetensors    its EMA weights, safetensors
    <name>.optim.pt           optimizer + LR-schedule state, torch.save
    rng-<process>.pt          python / numpy / torch CPU / CUDA generator states of each process, torch.save
    meta.json                 step, data position, EMA counters, the config, format version (written last)

Why torch.save for optimizer/schedule/RNG state: they are nested dicts of tensors, ints, floats, tuples and lists that
safetensors cannot express; they are read back with `torch.load(weights_only=True)`, whose unpickler only builds
tensors and plain containers, so a tampered file cannot run code. (accelerate's save_state pickles whole objects and
is loaded without that restriction; numpy's generator state is stored as a tensor for the same reason.)

The folder is written under a temporary dot-name and renamed when complete (ldm.io.atomic_directory); only names
`step-<digits>` with a readable meta.json count as checkpoints, so a run killed mid-write (SIGKILL, power loss) leaves
at most a `.step-*.tmp` folder that is never picked as "latest" and is removed by the next save.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.training.ema import EMA
from ldm.io import WeightsError, atomic_directory, load_state_dict, load_weights, read_json, save_state_dict, write_json

FORMAT_VERSION = 1
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------------- randomness


def step_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed fixed by (seed, *keys) alone (numpy SeedSequence hashing), e.g. (seed, step, micro, slot)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def slot_generators(seed: int, step: int, micro: int, slots: range) -> list[torch.Generator]:
    """One CPU generator per batch slot (global sample position), so noise, timesteps and dropout of a sample depend on
    (seed, step, micro-batch, slot) only: the same after a resume and for any split of the batch over processes."""
    return [torch.Generator().manual_seed(step_seed(seed, step, micro, slot)) for slot in slots]


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA) generator states, as weights_only-loadable objects."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states saved by `rng_state`."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_load(path: Path) -> Any:
    """Optimizer or RNG state saved by torch.save, read with weights_only=True; a file that unpickler cannot read
    (truncated, corrupt, or holding objects other than tensors and containers) is a WeightsError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        text = " ".join(str(e).split())
        reason = text.partition("WeightsUnpickler error: ")[2].partition(" Check the documentation")[0] or text[:160]
        raise WeightsError(f"{path}: unreadable checkpoint state (torch.load with weights_only=True): "
                           f"{reason or 'the file ends early'}") from e


def folder_digest(folder: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under `folder` (dot-names, i.e. temporaries, skipped):
    identifies the frozen parts a U-Net was trained with (recorded in meta.json, checked on resume and export)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder to hash not found: {folder}")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        digest.update(rel.as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------- finding


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root` as (step, folder), oldest first (temporary and half-written ones skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(root: str | Path, resume: str | None) -> Path | None:
    """`resume` = None (start fresh), "latest" (None when there is none yet) or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(root)
    path = Path(resume)
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no meta.json); "
                                f"complete ones under {root}: {[p.name for _, p in list_checkpoints(root)]}")
    return path


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and any leftover temporary folders; returns what went."""
    root = Path(root)
    removed = [p for _, p in list_checkpoints(root)[:-keep_last]] if keep_last > 0 else []
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(".step-") and p.is_dir()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# ---------------------------------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    models: dict[str, nn.Module],
    emas: dict[str, EMA | None],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    rng_states: list[dict[str, Any]],
    meta: dict[str, Any],
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically (see module docstring); models must be unwrapped. Returns its folder."""
    root = Path(root)
    final = root / checkpoint_name(step)
    with atomic_directory(final, may_replace=lambda p: (p / "meta.json").is_file()) as tmp:  # only a checkpoint
        for name, model in models.items():
            save_state_dict(model.state_dict(), tmp / f"{name}.safetensors", metadata={"format": "pt"})
            ema = emas.get(name)
            if ema is not None:
                save_state_dict(ema.tensors(), tmp / f"{name}.ema.safetensors", metadata={"format": "pt"})
            torch.save({"optimizer": optimizers[name].state_dict(), "lr_scheduler": schedulers[name].state_dict()},
                       tmp / f"{name}.optim.pt")
        for i, state in enumerate(rng_states):
            torch.save(state, tmp / f"rng-{i}.pt")
        ema_meta = {n: e.counters() for n, e in emas.items() if e is not None}
        write_json({"format_version": FORMAT_VERSION, "step": step, "parts": list(models), "ema": ema_meta,
                    "num_processes": len(rng_states), **meta}, tmp / "meta.json")
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = read_json(Path(path) / "meta.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: checkpoint format {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def load_checkpoint(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    emas: dict[str, EMA | None],
    optimizers: dict[str, Any],
    schedulers: dict[str, Any],
    process_index: int = 0,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into unwrapped models, EMAs, optimizers and schedules (and this process's RNG); returns meta."""
    path = Path(path)
    meta = read_meta(path)
    if sorted(meta["parts"]) != sorted(models):
        raise WeightsError(f"{path} holds parts {meta['parts']}, this run trains {sorted(models)}")
    for name, model in models.items():
        load_weights(model, load_state_dict(path / f"{name}.safetensors"), what=f"{path}/{name}")
        ema = emas.get(name)
        if ema is not None:
            ema_file = path / f"{name}.ema.safetensors"
            if not ema_file.is_file():
                raise WeightsError(f"{path} has no EMA weights for {name} but this run keeps an EMA")
            ema.load_state_dict({"weights": load_state_dict(ema_file), **meta["ema"][name]})
        state = _torch_load(path / f"{name}.optim.pt")
        optimizers[name].load_state_dict(state["optimizer"])
        schedulers[name].load_state_dict(state["lr_scheduler"])
    if restore_rng:
        rng_file = path / f"rng-{process_index}.pt"
        if rng_file.is_file():
            set_rng_state(_torch_load(rng_file))
    return meta


def load_weights_only(path: str | Path, name: str, *, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The (EMA, when present and asked for) weights of part `name` from a checkpoint, e.g. for export."""
    path = Path(path)
    read_meta(path)
    ema_file = path / f"{name}.ema.safetensors"
    if use_ema and ema_file.is_file():
        return load_state_dict(ema_file)
    if use_ema:
        raise WeightsError(f"{path} holds no EMA weights for {name!r} (trained with ema.enabled=false?); "
                           "pass use_ema=False to export the raw weights")
    return load_state_dict(path / f"{name}.safetensors")
