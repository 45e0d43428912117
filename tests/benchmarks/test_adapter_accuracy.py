"""The pieces of benchmarks/adapter_accuracy.py that need no training: the corpus reader and the split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks.adapter_accuracy import read_corpus, split


def _corpus(root: Path, sizes: dict[str, int]) -> Path:
    for topic, n in sizes.items():
        (root / topic).mkdir(parents=True)
        for i in range(n):
            (root / topic / f"{i:03d}.txt").write_text(f"{topic} headline {i}\n\n  body   of article {i}\n")
    (root / "business" / "notes.md").write_text("not an article")
    (root / "business" / "empty.txt").write_text("  \n")
    (root / "README").write_text("a file beside the topic folders")
    return root


def test_reader_one_row_per_article_labelled_by_its_folder(tmp_path: Path) -> None:
    rows = read_corpus(_corpus(tmp_path, {"business": 3, "sport": 2}))
    assert [r["id"] for r in rows] == [
        "business/000.txt",
        "business/001.txt",
        "business/002.txt",
        "sport/000.txt",
        "sport/001.txt",
    ]
    assert rows[0] == {"text": "business headline 0 body of article 0", "label": "business", "id": "business/000.txt"}
    assert Counter(r["label"] for r in rows) == {"business": 3, "sport": 2}


def test_split_is_stratified_disjoint_and_repeats(tmp_path: Path) -> None:
    sizes = {"business": 50, "sport": 30, "tech": 21}
    rows = read_corpus(_corpus(tmp_path, sizes))
    train, held = split(rows, 0.2, seed=0)
    assert Counter(r["label"] for r in held) == {t: round(n * 0.2) for t, n in sizes.items()}
    assert Counter(r["label"] for r in train) == {t: n - round(n * 0.2) for t, n in sizes.items()}
    ids = [r["id"] for r in train + held]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    again = split(list(reversed(rows)), 0.2, seed=0)  # the order rows come in does not matter
    assert [r["id"] for r in again[0]] == [r["id"] for r in train]
    assert [r["id"] for r in again[1]] == [r["id"] for r in held]
    other = split(rows, 0.2, seed=1)
    assert {r["id"] for r in other[1]} != {r["id"] for r in held}
    assert [r["label"] for r in train] != sorted(r["label"] for r in train)  # training order is shuffled
