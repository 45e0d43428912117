"""The CLI reference page, rendered from the typer app itself: every command, its usage, arguments and options
(grouped by help panel), with their help, type and default. The docs build writes it (`mkdocs_hooks.py`); it is never
written by hand, so it follows the code."""

from __future__ import annotations

import typer

from cli.main import app, commands


def _cell(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _type(param, ctx) -> str:
    return f"`{_cell(param.display_type(ctx)).strip('<>')}`" if not getattr(param, "is_flag", False) else "flag"


def _default(param) -> str:
    default = param.default
    if getattr(param, "is_flag", False) or default is None or default == () or default == []:
        return ""
    return f"`{default}`"


def _command(name: str, command, parent) -> list[str]:
    ctx = command.context_class(command, info_name=name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## surgery {name}", "", _cell(command.help), "", "```", f"surgery {name} {usage}", "```", ""]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    if arguments:
        lines += ["| argument | type | help |", "|---|---|---|"]
        lines += [f"| `{p.name.upper()}` | {_type(p, ctx)} | {_cell(p.help)} |" for p in arguments]
        lines.append("")
    panels: dict[str, list] = {}
    for p in command.params:
        if p.param_type_name == "option" and not p.hidden:
            panels.setdefault(p.rich_help_panel or "Options", []).append(p)
    for panel, params in panels.items():
        lines += [f"**{panel}**", "", "| option | type | default | help |", "|---|---|---|---|"]
        for p in params:
            names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
            lines.append(f"| {names} | {_type(p, ctx)} | {_default(p)} | {_cell(p.help)} |")
        lines.append("")
    return lines


def render() -> str:
    """The whole page, Markdown: the global options, then one section per command in the app's order."""
    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="surgery")
    lines = [
        "# CLI reference",
        "",
        "Generated from the command-line app when this site is built; `surgery COMMAND --help` prints the same.",
        "",
        _cell(group.help),
        "",
        "Conventions: `-o/--output` names what a command writes (written atomically); `--atol`/`--rtol` are the parity "
        "check's tolerances; `--json` prints machine-readable JSON on stdout. Three options take shapes, each its own "
        "thing: `--input-shape` describes the inputs of a plain `nn.Module` (names are dynamic axes), `run --shape` "
        "sizes the random inputs of one run, and `export --engine-shape` sets a TensorRT engine's MIN:OPT:MAX profile.",
        "",
        "| global option | help |",
        "|---|---|",
    ]
    lines += [f"| `{p.opts[0]}` | {_cell(p.help)} |" for p in group.params if not p.hidden]
    lines.append("")
    for name, command in commands().items():
        if not command.hidden:
            lines += _command(name, command, root)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
