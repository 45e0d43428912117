"""The CLI reference (cli/reference.py) is generated from the typer app when the docs build: every command, every
option spelling and every help text of the app appears in its section, and the docs build (mkdocs, strict) writes
that page. A command or option whose help changes without the page following fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import typer

from cli.main import COMMANDS, app, commands
from cli.reference import render
from tests.conftest import ROOT


def _flat(text: str | None) -> str:
    return " ".join((text or "").split()).replace("|", "\\|")


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"^## surgery (\S+)$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_command_option_and_help_is_in_the_reference():
    page = render()
    sections = _sections(page)
    group = typer.main.get_command(app)
    everyone = commands()
    assert set(sections) == {n for n, c in everyone.items() if not c.hidden} == set(COMMANDS)
    for name, command in everyone.items():
        section = sections[name]
        assert _flat(command.help) in section, name
        for param in command.params:
            if param.param_type_name == "option" and param.hidden:
                assert f"`{param.opts[0]}`" not in section, (name, param.opts)  # deprecated spellings stay out
                continue
            for spelling in [*param.opts, *param.secondary_opts]:
                shown = f"`{spelling.upper()}`" if param.param_type_name == "argument" else f"`{spelling}`"
                assert shown in section, (name, spelling)
            assert _flat(param.help) in section, (name, param.name)
    for param in group.params:
        assert f"`{param.opts[0]}`" in page and _flat(param.help) in page


def test_export_options_are_grouped_into_panels():
    section = _sections(render())["export"]
    panels = re.findall(r"^\*\*(.+)\*\*$", section, flags=re.M)
    assert len(panels) >= 4 and "Options" not in panels, panels


def test_the_reference_is_generated_not_committed():
    assert not (ROOT / "docs" / "reference" / "cli.md").exists()


def test_the_docs_build_strict_writes_the_reference(tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    html = (site / "reference" / "cli" / "index.html").read_text()
    for name in COMMANDS:
        assert f"surgery {name}" in html
