"""Every optional extra of pyproject.toml resolves against the package index, without installing it (`pip install
--dry-run` into a throwaway venv): the GPU and TensorRT wheels are gigabytes. The base and the `export` extra are
installed for real by `make setup` and by the runtime-only install test.

The `tensorrt` wheels on PyPI build their metadata by downloading from NVIDIA's host and fail on a machine without
an NVIDIA driver, so the trt extra is resolved without that one requirement; its import is guarded in the code.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNRESOLVABLE_HERE = ("tensorrt",)  # builds its metadata by downloading from NVIDIA


def main() -> int:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [n for n in extras if n not in ("export", "test")]
    skipped = [r for n in names for r in extras[n] if r.split("<")[0].split(">")[0].split("=")[0] in UNRESOLVABLE_HERE]
    resolvable = [n for n in names if not any(r in extras[n] for r in skipped)]
    rest = [r for n in names if n not in resolvable for r in extras[n] if r not in skipped]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        pip = [f"{tmp}/bin/pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check"]
        target = f"{ROOT}[{','.join(resolvable)}]"
        print(f"resolving {target} and {' '.join(rest)} (not {', '.join(skipped)}: no NVIDIA driver here)", flush=True)
        return subprocess.run([*pip, target, *rest]).returncode


if __name__ == "__main__":
    sys.exit(main())
