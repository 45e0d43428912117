"""The runtime's border: importing it (and the command line) loads neither torch nor transformers, and its modules
import one another only within the package, so its folder can be copied on its own."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime"
# what the runtime may import: its own modules (relatively), the standard library, and its dependencies
THIRD_PARTY = {"numpy", "onnx", "onnxruntime", "safetensors", "tokenizers"}
LAZY_ONLY = {"transformers"}  # a GGUF folder's tokenizer, imported in that branch alone
HEAVY = ("torch", "transformers")


def _loaded_after(code: str) -> dict[str, bool]:
    """Run `code` in a fresh interpreter at the repository root; which of HEAVY it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize(
    "code",
    [
        "import runtime; " + "; ".join(f"import runtime.{m}" for m in MODULES),
        "import cli.main, cli.run, cli.generate, cli.common",
        "from cli.main import app; import typer; typer.main.get_command(app).get_command(None, 'run')",
        "import exporters.runtime, exporters.inputs",  # the old import paths of the runtime's classes
    ],
    ids=["runtime", "cli", "run-command", "old-paths"],
)
def test_import_loads_neither_torch_nor_transformers(code):
    assert _loaded_after(code) == {m: False for m in HEAVY}


def test_the_probe_sees_torch_where_it_is_imported():
    """The probe itself can fail: the exporter's modules do import torch."""
    assert _loaded_after("import exporters.verify")["torch"]


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(level, module, line) of every import in a file, in functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or "", node.lineno))
    return found


@pytest.mark.parametrize("module", MODULES + ["__init__"])
def test_runtime_modules_import_only_the_package_stdlib_and_its_dependencies(module):
    path = RUNTIME / f"{module}.py"
    for level, name, line in _imports(path):
        top = name.split(".")[0]
        if level:  # relative: within the package
            continue
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        assert top in sys.stdlib_module_names or top in THIRD_PARTY or top in LAZY_ONLY or top == "__future__", where
        if top in LAZY_ONLY:
            assert module == "tokenizer", where
