"""The support matrix's table, rendered from the rows `make test-matrix` writes (tests/surgery/test_matrix.py).
The docs build renders it into docs/reference/support-matrix.md (mkdocs_hooks.py).

python -m benchmarks.matrix_table   # print the Markdown table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "matrix"
HEADER = (
    "| model_type | sites per layer | LoRA targets | baked | swappable | routed | LoRA baked | max abs diff | "
    "max rel diff | notes |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _mark(row: dict[str, Any], key: str) -> str:
    return "ok" if row.get(key) else ("-" if key == "lora" and not row.get("lora_targets") else "no")


def render(rows: list[dict[str, Any]]) -> str:
    """One Markdown line per family: what worked, the largest export-vs-torch difference, or why it fails."""
    lines = [HEADER]
    for row in rows:
        if "max_abs_diff" not in row:  # failed: what worked before the failure, and the failure
            sites = row.get("sites_per_layer", "-")
            lines.append(
                f"| {row['model_type']} | {sites} | {','.join(row.get('lora_targets', [])) or '-'} | "
                f"{_mark(row, 'baked')} | {_mark(row, 'swappable')} | {_mark(row, 'routed')} | {_mark(row, 'lora')} | "
                f"- | - | **fails**: {row.get('error', 'not run')} |"
            )
            continue
        lines.append(
            f"| {row['model_type']} | {row['sites_per_layer']} | {','.join(row['lora_targets']) or '-'} | "
            f"{_mark(row, 'baked')} | {_mark(row, 'swappable')} | {_mark(row, 'routed')} | {_mark(row, 'lora')} | "
            f"{row['max_abs_diff']:.1e} | {row['max_rel_diff']:.1e} | {row['note']} |"
        )
    return "\n".join(lines)


def load_rows(folder: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of <model_type>.json rows")
    args = parser.parse_args()
    rows = load_rows(args.results)
    if not rows:
        raise SystemExit(f"error: no rows in {args.results}; run make test-matrix first")
    print(render(rows))


if __name__ == "__main__":
    main()
