"""Entry point: `surgery COMMAND`. A `SurgeryError` is one red line and exit code 2; any other exception one line
naming the stage and the model, its traceback in a log file, and exit code 1 (`surgery --debug` shows it)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli import (
    bench,
    convert,
    count,
    demo,
    export,
    export_peft,
    generate,
    import_adapters,
    import_peft,
    inspect,
    insert,
    merge,
    pack,
    run,
    serve,
    train,
    trt,
)
from cli.common import Run, error_line, fail, quiet_libraries

app = typer.Typer(
    name="surgery",
    help="Insert, merge and export adapters in the fx graph of a pretrained Transformer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("inspect")(inspect.inspect)
app.command("insert")(insert.insert)
app.command("export")(export.export)
app.command("pack")(pack.pack)
app.command("run")(run.run)
app.command("bench")(bench.bench)
app.command("demo")(demo.demo)
app.command("swap")(trt.swap)
app.command("check-trt")(trt.check_trt)
app.command("count")(count.count)
app.command("merge")(merge.merge)
app.command("import-peft")(import_peft.import_peft)
app.command("import-adapters")(import_adapters.import_adapters)
app.command("export-peft")(export_peft.export_peft)
app.command("serve")(serve.serve)
app.command("generate")(generate.generate)
app.command("convert")(convert.convert)
app.command("train")(train.train)


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
        raise SystemExit(fail(exc, *command_and_model(argv), argv)) from exc


if __name__ == "__main__":
    main()
