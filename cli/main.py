"""Entry point: `surgery COMMAND`. A `SurgeryError` becomes one red line and exit code 2."""

from __future__ import annotations

import typer
from rich.markup import escape

from cli import bench, count, demo, export, import_peft, inspect, insert, merge, pack, run, trt
from cli.common import err, quiet_libraries
from surgery.errors import SurgeryError

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


def main() -> None:
    quiet_libraries()
    try:
        app()
    except SurgeryError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)  # escape: messages hold [brackets]
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
