"""Run ldm.training.unet in several local processes: `accelerate launch --multi_gpu` (torchrun; gloo DDP on a CPU-only
machine), each process with its own torch threads, and the global batch split between them.

Meant for several GPUs or many cores: on the 2-core CPU, two processes with one thread each train the default
model's U-Net at 0.78x the speed of one process with two threads (benchmarks/research/train_processes.py).
Slot generators (ldm.training.checkpoint.slot_generators) give every global slot the same record, timestep, noise and
dropout as one process would, so the runs differ only in float summation order (tests/training/test_train_multiprocess.py).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ldm.config import ConfigError, save_config
from ldm.training.config import TrainConfig


def free_port() -> int:
    """A TCP port free on this machine now (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_batch(config: TrainConfig, num_processes: int) -> TrainConfig:
    """`config` with run.batch_size (the global batch) divided between `num_processes`; a ConfigError if it does not
    divide evenly."""
    if num_processes < 1:
        raise ConfigError(f"num_processes must be >= 1, got {num_processes}")
    batch = config.run.batch_size
    if batch % num_processes:
        raise ConfigError(f"run.batch_size {batch} of {config.run.output_dir} does not split evenly between "
                          f"{num_processes} processes (num_processes)")
    return replace(config, run=replace(config.run, batch_size=batch // num_processes))


def launch_command(config_path: str | Path, num_processes: int, mixed_precision: str, port: int,
                   overrides: Sequence[str] = ()) -> list[str]:
    """The `accelerate launch` command line that runs `python -m ldm.training.unet --config config_path [overrides]` in N
    processes. `--cpu` alone would take accelerate's simple launcher (ONE process unless an mpirun hostfile is
    given); on a machine without GPUs `--multi_gpu` starts N processes with torchrun and accelerate picks MULTI_CPU
    (gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "ldm.training.unet", "--config", str(config_path), *overrides]


def launch_train(config: TrainConfig, num_processes: int, config_path: str | Path, *,
                 threads_per_process: int | None = 1) -> None:
    """Train `config` (run.batch_size = the global batch) in `num_processes` local processes; `config_path` receives
    the per-process config. Raises RuntimeError with the tail of the processes' output if the launch fails."""
    per_process = split_batch(config, num_processes)
    save_config(per_process, config_path)
    env = dict(os.environ)
    if threads_per_process is not None:
        env["OMP_NUM_THREADS"] = str(threads_per_process)
    cmd = launch_command(config_path, num_processes, str(config.run.mixed_precision), free_port())
    log = Path(config.run.output_dir).with_suffix(".launch.log")  # beside the run folder, which ldm.training.unet creates
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:  # appended, streamed: a resumed run keeps the earlier launches' output
        returncode = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"ldm.training.unet in {num_processes} processes ({config_path}) exited with {returncode}; "
                           f"output in {log}, last lines:\n{tail}")
