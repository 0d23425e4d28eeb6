"""The resumable training loop shared by ldm.training.unet (U-Net), ldm.training.vae (VAE + discriminator) and ldm.training.clip:
accumulate, clip, step, schedule, EMA, log, checkpoint (the checkpoint format is ldm.training.checkpoint's).

A micro-batch with no readable sample (ldm.training.data.collate returns pixel_values of shape (0, 3, 0, 0)) is handled here,
once for every application: it contributes a zero loss that touches every trained parameter (so gradient
accumulation and DDP's all-reduce see the same graph) and is counted under `skipped`; `step_fn` never sees it.
Unreadable images and missing captions are counted and judged by ldm.training.data_checks.DataChecks (`data`: the
run's DataConfig), which stops the run with a DataError past data.max_unreadable_fraction or data.missing_caption.

A losses.csv row holds the mean of each value over the micro-batches (of every process) since the previous row, and
the sums of the counts `skipped` and `missing_captions`. A checkpoint between two rows saves the partial sums in its
meta.json (`log_window`), so a resumed run writes the same rows as an uninterrupted one (images_per_s aside).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from ldm.training.checkpoint import (checkpoint_name, list_checkpoints, load_checkpoint, read_meta, resolve_resume, rng_state,
                            save_checkpoint, slot_generators, step_seed)
from ldm.training.data import samples_consumed
from ldm.training.data_checks import DataChecks, DataError
from ldm.training.ema import EMA
from ldm.training.fsdp import checkpoint_state, checkpoint_targets, is_sharded, shard_ema
from ldm.io import write_text


@dataclass
class Part:
    """One trained model with its optimizer (both as returned by accelerator.prepare), its LR schedule (NOT prepared:
    stepped exactly once per optimizer update whatever the number of processes) and its EMA (or None)."""

    name: str
    model: nn.Module
    optimizer: Any
    scheduler: Any
    ema: EMA | None = None
    state: nn.Module | None = None  # what is checkpointed and kept an EMA of; None: the unwrapped model (a LoRA run:
    # ldm.training.lora.lora_modules, the adapters alone)


@dataclass
class StepContext:
    """Where a micro-batch sits: `step` optimizer updates done, micro-batch `micro` of the update, this process."""

    step: int
    micro: int
    seed: int
    process_index: int
    batch_size: int

    def generators(self, n: int) -> list[torch.Generator]:
        """Generators of this process's first `n` batch slots (global slot = process * batch_size + i)."""
        first = self.process_index * self.batch_size
        return slot_generators(self.seed, self.step, self.micro, range(first, first + n))


def _csv_text(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


class MetricsLogger:
    """Rows of metrics to a CSV file (and TensorBoard when installed); on resume, rows past the resumed step go (the
    kept rows are rewritten atomically through ldm.io.write_text, so a crash never leaves a truncated file)."""

    def __init__(self, path: Path, *, resume_step: int = 0, enabled: bool = True) -> None:
        self.path, self.enabled, self.columns, self.tb = path, enabled, None, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                self.columns = rows[0]
                kept = [r for r in rows[1:] if r and int(r[0]) <= resume_step]
                write_text(_csv_text([rows[0], *kept]), path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.columns is None:
            self.columns = ["step", *metrics]
            write_text(_csv_text([self.columns]), self.path)
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([step, *(f"{metrics.get(c, float('nan')):.8g}" for c in self.columns[1:])])
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


COUNTS = ("skipped", "missing_captions")  # summed into a losses.csv row; every other value is a mean


class LogWindow:
    """Sums of the logged values since the last losses.csv row, over this process's micro-batches (`rows` of them)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.rows = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.rows += 1

    def _total(self) -> tuple[dict[str, float], int]:
        """The sums and rows of every process (a collective: every process calls it)."""
        sums: dict[str, float] = {}
        rows = 0
        for part_sums, part_rows in gather_object([(self.sums, self.rows)]):
            for k, v in part_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            rows += part_rows
        return sums, rows

    def metrics(self) -> dict[str, float]:
        """The row's values (means, and sums for COUNTS) over every process; the window starts again (collective)."""
        sums, rows = self._total()
        self.sums, self.rows = {}, 0
        return {k: v if k in COUNTS else v / max(rows, 1) for k, v in sorted(sums.items())}

    def state_dict(self) -> dict[str, Any]:
        """The partial window of every process, for a checkpoint's meta.json (collective)."""
        sums, rows = self._total()
        return {"sums": sums, "rows": rows}

    def load_state_dict(self, state: dict[str, Any], process_index: int) -> None:
        """Start from a saved partial window; it is counted once, by process 0."""
        if process_index == 0:
            self.sums, self.rows = {k: float(v) for k, v in state["sums"].items()}, int(state["rows"])


def batch_length(batch: dict[str, Any]) -> int:
    """The number of readable samples in a collated micro-batch (captions, else pixel_values' first dimension)."""
    if "captions" in batch:
        return len(batch["captions"])
    return len(batch["pixel_values"])


def zero_loss(parts: list[Part]) -> torch.Tensor:
    """0 * sum of every trained parameter: a loss of exactly zero whose backward gives every parameter a zero grad."""
    return sum(p.sum() for part in parts for p in part.model.parameters() if p.requires_grad) * 0.0


def check_fresh_output(root: Path) -> None:
    """A fresh run (run.resume unset) must not write into a run folder that already holds checkpoints."""
    found = list_checkpoints(root)
    if found:
        raise FileExistsError(
            f"{root} already holds checkpoints ({found[-1][1].name} newest) from another run: continue it with "
            "run.resume=latest (--resume latest), or choose another run.output_dir")


def run_loop(
    accelerator: Any,
    run: Any,
    optim: Any,
    *,
    parts: list[Part],
    loader: Any,
    position: Any,
    step_fn: Callable[[dict[str, Any], StepContext], tuple[torch.Tensor, dict[str, float]]],
    meta: dict[str, Any],
    on_step: Callable[[int], None] | None = None,
    on_resume: Callable[[dict[str, Any]], None] | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Train `parts` until run.max_steps optimizer updates: accumulate, clip, step, schedule, EMA, log, checkpoint.

    `step_fn(batch, ctx)` returns (loss, logs) of one non-empty micro-batch; its randomness must come from
    ctx.generators (and the global torch RNG, which is re-seeded from (seed, step, micro, process) before every
    micro-batch), so a resumed run repeats the uninterrupted one exactly. `run` is a RunConfig, `optim` an OptimConfig
    (ldm.training.config). `on_resume(meta)` sees the meta.json of the checkpoint resumed from, before anything is
    loaded from it (to check it). `data` is the DataConfig (its checks' limits; None: DataConfig's defaults).
    """
    out = Path(run.output_dir)
    root = out / "checkpoints"
    main = accelerator.is_main_process
    raw = {p.name: p.state if p.state is not None else accelerator.unwrap_model(p.model) for p in parts}
    if is_sharded(raw.values()):  # FSDP (ldm.training.fsdp): each EMA keeps the shards of the parameters it follows
        for p in parts:
            if p.ema is not None:
                shard_ema(p.ema, raw[p.name])
    step = 0
    window, checks = LogWindow(), DataChecks.from_config(data, getattr(position, "num_samples", None))
    resume = resolve_resume(root, run.resume)
    if run.resume is None:
        check_fresh_output(root)
    if resume is not None:
        if on_resume is not None:  # before anything loads, so a mismatch is named, not a shape error from torch
            on_resume(read_meta(resume))
        models, emas, optimizers = checkpoint_targets(raw, parts)  # FSDP: full tensors in, each process's shard kept
        state = load_checkpoint(resume, models=models, emas=emas, optimizers=optimizers,
                                schedulers={p.name: p.scheduler for p in parts},
                                process_index=accelerator.process_index)
        step = int(state["step"])
        position.load_state_dict(state["data"])
        if "log_window" in state:  # checkpoints before issue 31 have none: the first row then starts at the resume
            window.load_state_dict(state["log_window"], accelerator.process_index)
            checks.load_state_dict(state["data_checks"])
        if "step_state" in state:  # the step's own state, e.g. objective.loss=vlb's importance sampler, per process
            step_fn.load_state_dict(state["step_state"][accelerator.process_index])  # type: ignore[attr-defined]
    logger = MetricsLogger(out / "losses.csv", resume_step=step, enabled=main)
    bar = tqdm(total=run.max_steps, initial=step, disable=not (main and run.progress_bar), desc="train")
    procs = accelerator.num_processes
    epoch, consumed, micro, empty_epochs = position.epoch, 0, 0, 0
    clock, images, last_ckpt = time.perf_counter(), 0, resume
    while step < run.max_steps:
        loader.set_epoch(epoch)
        for batch in loader:
            empty_epochs = 0
            torch.manual_seed(step_seed(run.seed, step, micro, accelerator.process_index))
            ctx = StepContext(step, micro, run.seed, accelerator.process_index, run.batch_size)
            n = batch_length(batch)
            with accelerator.accumulate(*[p.model for p in parts]):
                loss, logs = step_fn(batch, ctx) if n > 0 else (zero_loss(parts), {})
                accelerator.backward(loss)
                if accelerator.sync_gradients and optim.max_grad_norm is not None:
                    for p in parts:
                        accelerator.clip_grad_norm_(p.model.parameters(), optim.max_grad_norm)
                for p in parts:
                    p.optimizer.step()
                    p.optimizer.zero_grad(set_to_none=True)
            consumed, micro = consumed + 1, micro + 1
            images += n
            checks.add(batch, n)
            window.add({"loss": float(loss.detach()), "skipped": float(batch.get("num_skipped", 0)),
                        "missing_captions": float(len(batch.get("missing_captions", ()))), **logs})
            if not accelerator.sync_gradients:
                continue
            checks.update(accelerator)  # before anything of this update is logged or saved
            step, micro = step + 1, 0
            for p in parts:
                if not getattr(p.optimizer, "step_was_skipped", False):  # fp16 overflow: no update, no schedule step
                    p.scheduler.step()
                if p.ema is not None:
                    p.ema.update(raw[p.name])
            bar.update(1)
            if step % run.log_every == 0 or step == run.max_steps:
                metrics = window.metrics()
                elapsed = time.perf_counter() - clock
                metrics["images_per_s"] = images * procs / max(elapsed, 1e-9)
                metrics["lr"] = parts[0].scheduler.get_last_lr()[0]
                logger.log(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
                clock, images = time.perf_counter(), 0
            if step % run.checkpoint_every == 0 or step == run.max_steps:
                rngs = gather_object([rng_state()])
                step_states = gather_object([step_fn.state_dict() if hasattr(step_fn, "state_dict") else {}])
                log_window = window.state_dict()
                models, emas, optimizers = checkpoint_state(raw, parts, keep=main)  # FSDP: gathered (collective)
                if main:
                    where = position.state_dict(samples_consumed(consumed, run.batch_size, procs))
                    save_checkpoint(root, step, models=models, emas=emas, optimizers=optimizers,
                                    schedulers={p.name: p.scheduler for p in parts}, rng_states=rngs,
                                    meta={**meta, "data": where, "log_window": log_window,
                                          "data_checks": checks.state_dict(),
                                          **({"step_state": step_states} if any(step_states) else {})},
                                    keep_last=run.keep_last)
                accelerator.wait_for_everyone()
                last_ckpt = root / checkpoint_name(step)
            if on_step is not None:
                on_step(step)
            if step >= run.max_steps:
                break
        else:
            epoch, consumed, empty_epochs = epoch + 1, 0, empty_epochs + 1
            if empty_epochs == 2:  # one may be the empty rest of a streamed epoch resumed at its very end
                where = getattr(data, "path", "the data")
                raise DataError(f"no records to train on in {where}: an epoch yielded no batch")
    bar.close()
    logger.close()
    return {"step": step, "checkpoint": last_ckpt}
