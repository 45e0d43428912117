"""The real tier runs only when asked for (`pytest -m real`, `make test-real`); `make test` never collects its
work. `--real-results PATH.json` writes every checkpoint's figures there, and a Markdown table beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

RESULTS: dict[str, dict] = {}  # checkpoint name -> its figures, filled by the tests


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-results", default=None, help="write the real tier's figures to this .json (and .md)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "real" in (config.option.markexpr or ""):
        return
    here = Path(__file__).parent
    kept = [i for i in items if here not in Path(str(i.fspath)).parents]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    """Rewritten after every test, so a run cut short still leaves what it measured."""
    if _CONFIG:
        _write(_CONFIG[0])


_CONFIG: list[pytest.Config] = []


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG.append(config)


def _write(config: pytest.Config) -> None:
    path = config.getoption("--real-results")
    if not path or not RESULTS:
        return
    from tests.real.report import markdown

    path = Path(path)
    path.write_text(json.dumps(RESULTS, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(RESULTS))
