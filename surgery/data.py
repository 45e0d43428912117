"""Training data: rows of a JSONL, CSV or Parquet file, tokenized for a task.

- sequence classification: a text (and an optional second text, for pairs such as entailment) and a label;
- token classification: a list of words and a list of labels, one per word (in a CSV: both space-separated);
  the label goes to each word's first token, the others are ignored by the loss;
- causal LM: a text, and an optional prompt before it: the loss then covers the text (the response) only.

A label is a class index (an integer, or a string of digits) or a class name. Names map to the head's classes by the
base config's `label2id` when it names them all, else in sorted order.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.bundle import Dataset
from surgery.errors import SurgeryError
from surgery.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

IGNORE = -100  # the label cross-entropy skips
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_FIELDS = {  # task -> (text, label)
    SEQUENCE_CLASSIFICATION: ("text", "label"),
    TOKEN_CLASSIFICATION: ("tokens", "tags"),
    CAUSAL_LM: ("text", None),
}


@dataclass(frozen=True)
class Fields:
    """Which field of a row holds what (`--text-field`, `--label-field`, `--pair-field`, `--prompt-field`)."""

    text: str
    label: str | None = None
    pair: str | None = None  # sequence classification: the second text of a pair
    prompt: str | None = None  # causal LM: the prompt, not in the loss

    @classmethod
    def for_task(
        cls, task: str, text: str | None = None, label: str | None = None, pair: str | None = None, prompt=None
    ) -> Fields:  # noqa: ANN001
        default_text, default_label = DEFAULT_FIELDS[task]
        if task == CAUSAL_LM and label is not None:
            raise SurgeryError("--label-field: a causal LM learns its text; give --prompt-field for a prompt instead")
        if task != CAUSAL_LM and prompt is not None:
            raise SurgeryError(f"--prompt-field is for --task {CAUSAL_LM}; a {task} takes --text-field, --label-field")
        if task != SEQUENCE_CLASSIFICATION and pair is not None:
            raise SurgeryError(f"--pair-field is for --task {SEQUENCE_CLASSIFICATION}")
        return cls(text or default_text, label or default_label, pair, prompt)

    def needed(self) -> list[str]:
        return [f for f in (self.text, self.label, self.pair, self.prompt) if f is not None]


@dataclass
class Example:
    """One tokenized row: token ids, and the label (a class) or labels (one per token, IGNORE where none)."""

    ids: list[int]
    label: int | list[int]


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int  # rows cut to the model's positions


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSONL (one object a line), CSV (a header line) or Parquet file; refuses an empty one."""
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise SurgeryError(f"{name}: no such file; give a JSONL, CSV or Parquet file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SurgeryError(f"{name} line {i}: not JSON ({exc.msg}); give one JSON object a line") from exc
                if not isinstance(row, dict):
                    raise SurgeryError(f"{name} line {i}: a {type(row).__name__}, not an object; one object a line")
                rows.append(row)
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise SurgeryError(f"{name}: reading Parquet needs pyarrow: pip install 'surgery[train]'") from exc
        rows = pq.read_table(path).to_pylist()
    else:
        raise SurgeryError(f"{name}: a {suffix or 'suffix-less'} file; give .jsonl, .csv or .parquet")
    if not rows:
        raise SurgeryError(f"{name}: empty, no rows to train or evaluate on; give a file with at least one row")
    return rows


def dataset(path: str | Path, rows: list[dict[str, Any]]) -> Dataset:
    """The record of a data file: its name, sha256 and rows (the fingerprint the manifest keeps)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return Dataset(str(path), digest.hexdigest(), len(rows))


def check_fields(rows: list[dict[str, Any]], fields: Fields, name: str) -> None:
    """Every row has every field the task reads; the first that lacks one is named with its fix."""
    options = {"text": "--text-field", "label": "--label-field", "pair": "--pair-field", "prompt": "--prompt-field"}
    for i, row in enumerate(rows, 1):
        for role in ("text", "label", "pair", "prompt"):
            field = getattr(fields, role)
            if field is not None and (field not in row or row[field] is None):
                have = ", ".join(map(str, row)) or "none"
                raise SurgeryError(
                    f"{name} row {i}: no field {field!r} (its fields: {have}); name the field with {options[role]}"
                )


def _words(value: Any, name: str, i: int, field: str) -> list[Any]:
    """A token-classification cell: a list, or a space-separated string (CSV)."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise SurgeryError(f"{name} row {i}: field {field!r} is a {type(value).__name__}; give a list or a string")


def _index(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def head_labels(
    rows: list[dict[str, Any]], fields: Fields, task: str, classes: int, config: dict[str, Any], name: str
) -> Labels:
    """The class names of the head, in its order, checked against the labels of `rows` (the training data)."""
    check_fields(rows, fields, name)
    values = _label_values(rows, fields, task, name)
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    if all(_index(v) is not None for _, v in values):
        for i, v in values:
            k = _index(v)
            if not 0 <= k < classes:  # type: ignore[operator]
                raise SurgeryError(
                    f"{name} row {i}: label {v} is outside the head's {classes} classes (0..{classes - 1}); "
                    f"give --num-labels for a new head of more classes"
                )
        return Labels(tuple(id2label.get(k, str(k)) for k in range(classes)), by_index=True)
    texts = sorted({str(v) for _, v in values})
    named = {str(v) for v in id2label.values()}
    if set(texts) <= named and not all(v.startswith("LABEL_") for v in named) and len(id2label) == classes:
        return Labels(tuple(id2label[k] for k in range(classes)), by_index=False)
    if len(texts) > classes:
        raise SurgeryError(
            f"{name}: {len(texts)} labels ({', '.join(texts[:6])}{', ...' if len(texts) > 6 else ''}) but the head "
            f"has {classes} classes; give --num-labels {len(texts)} for a new head"
        )
    return Labels(tuple(texts) + tuple(f"unused_{k}" for k in range(len(texts), classes)), by_index=False)


def _label_values(rows: list[dict[str, Any]], fields: Fields, task: str, name: str) -> list[tuple[int, Any]]:
    assert fields.label is not None
    if task == TOKEN_CLASSIFICATION:
        return [(i, v) for i, row in enumerate(rows, 1) for v in _words(row[fields.label], name, i, fields.label)]
    return [(i, row[fields.label]) for i, row in enumerate(rows, 1)]


@dataclass(frozen=True)
class Labels:
    """The head's classes: their names in order, and whether the data gives labels as indices or as names."""

    names: tuple[str, ...]
    by_index: bool

    def index(self, value: Any, name: str, i: int) -> int:
        """The class of one label of row `i` of `name`; a label outside the head's classes is refused."""
        k = _index(value) if self.by_index else None
        if self.by_index:
            if k is None or not 0 <= k < len(self.names):
                raise SurgeryError(
                    f"{name} row {i}: label {value!r} is outside the head's {len(self.names)} classes "
                    f"(0..{len(self.names) - 1})"
                )
            return k
        if str(value) not in self.names:
            raise SurgeryError(
                f"{name} row {i}: label {value!r} is none of the head's classes ({', '.join(self.names)}); "
                "give labels the training data has"
            )
        return self.names.index(str(value))


def encode(
    rows: list[dict[str, Any]],
    task: str,
    fields: Fields,
    tokenizer: Any,
    max_length: int,
    labels: Labels | None,
    name: str,
) -> Encoded:
    """Tokenize `rows` for `task`, each cut to `max_length` tokens (counted in `truncated`)."""
    check_fields(rows, fields, name)
    if task == TOKEN_CLASSIFICATION and not getattr(tokenizer, "is_fast", False):
        raise SurgeryError(
            f"token classification maps words to tokens with a fast tokenizer (tokenizer.json); "
            f"{type(tokenizer).__name__} is not one: pass --tokenizer FOLDER of a fast tokenizer"
        )
    examples, truncated = [], 0
    eos = getattr(tokenizer, "eos_token_id", None)
    for i, row in enumerate(rows, 1):
        if task == SEQUENCE_CLASSIFICATION:
            texts = [str(row[fields.text])] + ([str(row[fields.pair])] if fields.pair else [])
            ids = tokenizer(*texts)["input_ids"]
            if len(ids) > max_length:
                truncated += 1
                ids = tokenizer(*texts, truncation=True, max_length=max_length)["input_ids"]
            assert labels is not None
            examples.append(Example(ids, labels.index(row[fields.label], name, i)))
        elif task == TOKEN_CLASSIFICATION:
            words = [str(w) for w in _words(row[fields.text], name, i, fields.text)]
            tags = _words(row[fields.label], name, i, fields.label)  # type: ignore[arg-type]
            if len(words) != len(tags):
                raise SurgeryError(
                    f"{name} row {i}: {len(words)} words but {len(tags)} labels; give one label per word"
                )
            enc = tokenizer(words, is_split_into_words=True)
            if len(enc["input_ids"]) > max_length:
                truncated += 1
                enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
            assert labels is not None
            targets, seen = [], set()
            for w in enc.word_ids():
                if w is None or w in seen:
                    targets.append(IGNORE)
                else:
                    seen.add(w)
                    targets.append(labels.index(tags[w], name, i))
            examples.append(Example(list(enc["input_ids"]), targets))
        else:
            text_ids = tokenizer(str(row[fields.text]), add_special_tokens=fields.prompt is None)["input_ids"]
            text_ids = list(text_ids) + ([eos] if eos is not None and text_ids[-1:] != [eos] else [])
            prompt = tokenizer(str(row[fields.prompt]))["input_ids"] if fields.prompt else []
            ids = list(prompt) + text_ids
            targets = [IGNORE] * len(prompt) + text_ids
            if len(ids) > max_length:
                truncated += 1
                ids, targets = ids[:max_length], targets[:max_length]
            examples.append(Example(ids, targets))
    return Encoded(examples, truncated)


def load_tokenizer(source_path: str, override: str | None, vocab: int | None) -> Any:
    """The tokenizer of `--tokenizer`, else the one saved beside the model's source (its folder)."""
    path = Path(override) if override else Path(source_path)
    folder = path if path.is_dir() else path.parent
    how = "pass --tokenizer FOLDER (a folder with tokenizer.json or a tokenizer's vocabulary)"
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        where = f"--tokenizer {override}" if override else f"the model's source folder {folder}"
        raise SurgeryError(f"no tokenizer in {where}; {how}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a bad folder
        raise SurgeryError(
            f"{folder}: not a tokenizer transformers reads ({type(exc).__name__}: {exc}); {how}"
        ) from exc
    if vocab is not None and len(tokenizer) > vocab:
        raise SurgeryError(
            f"the tokenizer of {folder} has {len(tokenizer):,} tokens, the model's embedding {vocab:,}: another "
            f"model's tokenizer; {how} of this model"
        )
    return tokenizer
