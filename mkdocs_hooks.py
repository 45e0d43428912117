"""MkDocs hooks: the pages generated when the site is built, never committed.

- `reference/cli.md`: the CLI reference, rendered from the typer app (`cli/reference.py`);
- the support matrix's table, rendered from `benchmarks/results/matrix/*.json` (`benchmarks/matrix_table.py`) into
  `reference/support-matrix.md` at its marker;
- `reports/`: the dated benchmark reports, `benchmarks/README.md` and every file under `benchmarks/results/`, so
  that the benchmarks page links to them inside the site.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
MATRIX_MARKER = "<!-- support-matrix -->"


def on_files(files, config):
    from cli.reference import render

    files.append(File.generated(config, "reference/cli.md", content=render()))
    files.append(File.generated(config, "reports/index.md", abs_src_path=str(ROOT / "benchmarks" / "README.md")))
    results = ROOT / "benchmarks" / "results"
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        uri = f"reports/results/{path.relative_to(results).as_posix()}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if MATRIX_MARKER in markdown:
        from benchmarks.matrix_table import load_rows, render

        markdown = markdown.replace(MATRIX_MARKER, render(load_rows()))
    return markdown
