"""Where a model came from: what `load` records and every manifest repeats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Source:
    """Where a model came from: what the user typed, the file or folder, its sha256, its HF model type."""

    name: str
    path: str
    sha256: str
    model_type: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "model_type": self.model_type}
