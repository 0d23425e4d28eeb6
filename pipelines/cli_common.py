"""What the `ldm` commands share: exit codes, the one error channel, and loading a model.

Every failure leaves a command through `report`:

- bad input (a UsageError, or a ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
  IsADirectoryError or PermissionError: an option out of range, a missing or malformed model, config, data or
  checkpoint file, a YAML file with a tag the safe loader refuses, an unreadable pickle, ...): one line
  `ldm: error: ...` on stderr, exit code 2;
- the machine failing the command (another OSError such as a full disk, running out of memory, non-finite values
  from the network): one line `ldm: error: ...`, exit code 1;
- anything else is a bug in ldm: its traceback, then `ldm: internal error: ...` asking for a report, exit code 1.

`ldm --debug COMMAND ...` prints the traceback before the line in every case.
"""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input from the command line: reported as one line on stderr with exit code 2."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
    PermissionError, pickle.UnpicklingError,
)
FAILURES: tuple[type[BaseException], ...] = (OSError, MemoryError, FloatingPointError)


def one_line(e: BaseException) -> str:
    """The message on one line (a KeyError's quotes and any newlines removed)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split()) or type(e).__name__


def is_user_error(e: BaseException) -> bool:
    """Whether `e` means bad input (module docstring); YAML and image-decoding errors are checked by class only when
    their library is already imported, so the check imports nothing."""
    if isinstance(e, USER_ERRORS):
        return True
    yaml, pil = sys.modules.get("yaml"), sys.modules.get("PIL.Image")
    return (yaml is not None and isinstance(e, yaml.YAMLError)) or (
        pil is not None and isinstance(e, pil.UnidentifiedImageError))


def is_failure(e: BaseException) -> bool:
    """Whether `e` is the machine failing the command (a full disk, out of memory; torch's OutOfMemoryError too)."""
    return isinstance(e, FAILURES) or any(t.__name__ == "OutOfMemoryError" for t in type(e).__mro__)


def report(e: Exception, debug: bool = False) -> int:
    """Print `e` the way the module docstring says; its exit code. A reader that closed stdout (`ldm ... | head`)
    ends the command quietly, as other command-line tools do."""
    if isinstance(e, BrokenPipeError):
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return EXIT_FAILURE
    user, failure = is_user_error(e), is_failure(e)
    if debug or not (user or failure):
        traceback.print_exception(e, file=sys.stderr)
    if user or failure:
        print(f"ldm: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE if user else EXIT_FAILURE
    print(f"ldm: internal error: {type(e).__name__}: {one_line(e)} (a bug in ldm, not in your input: please report "
          "it with the traceback above)", file=sys.stderr)
    return EXIT_FAILURE


def load_model(model: str | None, allow_pickle: bool, prediction_type: str | None = None,
               config: str | None = None) -> Any:
    """Components from a folder, a single file (with `config`, a pipeline folder whose configs fit it) or a hub name
    (default: the bundled model)."""
    from ldm.loading.single_file import load_single_file
    from ldm.loading.sources import DEFAULT_MODEL, load_components

    path = Path(model).expanduser() if model is not None else DEFAULT_MODEL
    if prediction_type is not None and path.is_file():
        return load_single_file(path, allow_pickle=allow_pickle, prediction_type=prediction_type,
                                config_folder=config)
    components = load_components(path if model is None else model, allow_pickle=allow_pickle, config=config)
    if prediction_type is not None:
        from ldm.diffusion.schedule import NoiseSchedule

        data = {**components.schedule.to_diffusers(), "prediction_type": prediction_type}
        components.schedule = NoiseSchedule.from_diffusers(data)
    return components
