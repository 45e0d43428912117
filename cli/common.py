"""What every command shares: progress steps, output, and how a failure ends the process (the option
aliases are cli/options.py's).

A `SurgeryError` (the user's to fix) is one `error:` line and exit 2. Any other exception is ours: one `error:`
line naming the stage (the `step` that was running) and the model, the full traceback written to a log file in the
temp folder whose path that line gives, and exit 1; `surgery --debug COMMAND` prints the traceback instead.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape

from surgery.errors import SurgeryError

from surgery.quiet import quiet_libraries  # noqa: F401  (moved down: benchmarks use it too)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def renamed(new: Any, old: Any, new_name: str, old_name: str, default: Any = None) -> Any:
    """The value of an option given under its new name, or under its old one with a deprecation line on stderr."""
    if old is None:
        return new
    if new != default:
        raise SurgeryError(f"{old_name} and {new_name} are one option under two names; give {new_name} only")
    err.print(f"[yellow]warning: {old_name} is deprecated and goes in the next release; use {new_name}[/]")
    return old


class Run:
    """What the process is doing, for the message of a failure: set by `--debug` and by each `step`."""

    debug = False
    stage: str | None = None


@contextmanager
def stage(label: str) -> Iterator[None]:
    """Name what runs inside, for the error line of an internal failure (no output of its own)."""
    Run.stage = label
    yield
    Run.stage = None


@contextmanager
def step(label: str) -> Iterator[None]:
    """A spinner while `label` runs, then a tick and the seconds it took (on stderr)."""
    start = time.perf_counter()
    with stage(label), err.status(f"{label} ..."):
        yield
    err.print(f"[green]✓[/] {label} [dim]({time.perf_counter() - start:.1f} s)[/]")


def error_line(text: str) -> None:
    err.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True)  # escape: messages hold [brackets]


def write_error_log(exc: BaseException, argv: list[str]) -> str:
    """The traceback, the command line and the versions, in `surgery-error-<time>-<pid>.log` in the temp folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(tempfile.gettempdir(), f"surgery-error-{stamp}-{os.getpid()}.log")
    versions = []
    for module in ("torch", "transformers", "onnx", "onnxruntime"):
        mod = sys.modules.get(module)
        versions.append(f"{module} {getattr(mod, '__version__', 'not loaded')}")
    with open(path, "w") as fh:
        fh.write(f"command: surgery {' '.join(argv)}\nstage: {Run.stage or 'outside any step'}\n")
        fh.write(f"python {platform.python_version()} on {platform.platform()}; {', '.join(versions)}\n\n")
        fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def fail(exc: BaseException, command: str, model: str | None, argv: list[str]) -> int:
    """Report an exception that escaped a command; return the exit code (2 for the user's error, 1 for ours)."""
    if Run.debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    if isinstance(exc, SurgeryError):
        error_line(str(exc))
        return 2
    lines = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    context = [f"stage {Run.stage!r}"] if Run.stage else []
    context += [f"model {model}"] if model else []
    where = f"internal error in surgery {command} ({', '.join(context) or 'before any stage'}): {what}"
    if Run.debug:
        error_line(f"{where}; traceback above")
        return 1
    try:
        log = write_error_log(exc, argv)
    except OSError as log_exc:
        error_line(f"{where}; the traceback could not be written ({log_exc}): rerun with --debug to see it")
        return 1
    error_line(f"{where}; traceback in {log} (or rerun with surgery --debug)")
    return 1


def emit_json(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    sys.stdout.flush()
