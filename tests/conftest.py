"""Shared fixtures: the real pretrained MiniLM captured once per session, small random-weight models,
and a runner for the CLI as a subprocess."""

from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from surgery.capture import Captured
from surgery.pipeline import open_model, stand_in_adapted
from tests.families import write_config, write_lm_config

SURGERY = [sys.executable, "-m", "cli.main"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def minilm_base() -> Captured:
    """The pretrained MiniLM, captured once. Do not mutate: take `minilm` for a private copy."""
    return open_model("minilm")


@pytest.fixture(scope="session")
def adapterhub_gpt2() -> Captured:
    """The GPT-2-shaped base of the AdapterHub references (tests/data/adapterhub/gpt2-tiny: width 32, 2 layers),
    captured once. Do not mutate: copy its `gm`."""
    return open_model(str(ROOT / "tests" / "data" / "adapterhub" / "gpt2-tiny"))


@pytest.fixture
def minilm(minilm_base: Captured) -> Captured:
    """A private copy of the captured MiniLM that a test may rewrite."""
    return dataclasses.replace(minilm_base, gm=copy.deepcopy(minilm_base.gm))


def make_adapted(base: Captured, folder: Path, r: int = 8, seed: int = 0, spec=None) -> Captured:
    """An adapted copy of `base` with distinct stand-in adapter weights, saved as .adapted.pt2 and reopened,
    as a user's trained model would arrive."""
    from surgery.adapters import AdapterSpec

    return stand_in_adapted(
        base, spec or AdapterSpec("houlsby", r=r), folder / f"m{r}_{seed}.adapted.pt2", seed, 100 + seed
    )


class TinyBlock(nn.Module):
    """A pre-norm Transformer block written by hand: no preset knows it, the graph rule must."""

    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x)))))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 32, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def fused_adapter_ops(graph) -> collections.Counter:
    """The op types of an ONNX graph's nodes that read an adapter's weight, after checking surgery/fuse.py's form:
    each up-projection a MatMul whose one consumer is the Add of the residual (not a Gemm with the residual as C)."""
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    ops = collections.Counter()
    for n in graph.node:
        if any(i.startswith("adapters.") for i in n.input):
            ops[n.op_type] += 1
            if any(i.endswith(".up_w") for i in n.input):
                assert n.op_type == "MatMul", f"{n.name}: the up-projection is a {n.op_type}"
                assert [u.op_type for u in users[n.output[0]]] == ["Add"], f"{n.name} is not followed by one Add"
    return ops


@pytest.fixture(scope="session")
def tiny_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-written 2-block Transformer, exported with dynamic batch and sequence and saved as .pt2."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=256)
    program = torch.export.export(model, (torch.randn(2, 16, 32),), dynamic_shapes=({0: batch, 1: seq},), strict=False)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt2"
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory):
    """Write the small transformers config.json of a model type (`tests/families.py`); returns its path."""

    def make(model_type: str) -> Path:
        return write_config(model_type, tmp_path_factory.mktemp(model_type))

    return make


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


@pytest.fixture(scope="session")
def cli():
    """Run `surgery ARGS` as a subprocess (in `cwd`), returning exit code and both streams."""

    def run(*args: str, cwd: Path | None = None) -> Run:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        p = subprocess.run([*SURGERY, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
        return Run(p.returncode, p.stdout, p.stderr)

    return run


# Causal LMs (tests/exporters/test_generate.py): tiny configs of four families, rows of tests/families.py FAMILIES
# saved as a Hugging Face causal-LM class (CAUSAL_LMS there), so the default task is causal-lm.
@pytest.fixture(scope="session")
def lm_config(tmp_path_factory: pytest.TempPathFactory):
    """The config.json of a tiny causal LM of `family` (tests/families.py CAUSAL_LMS), written once per session."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = write_lm_config(family, tmp_path_factory.mktemp(f"lm-{family}"))
        return made[family]

    return make


@pytest.fixture(scope="session")
def lm_base(lm_config):
    """A tiny causal LM of `family`, captured once per session with its KV cache. Do not mutate."""
    made: dict[str, Captured] = {}

    def make(family: str) -> Captured:
        if family not in made:
            made[family] = open_model(str(lm_config(family)))
        return made[family]

    return make
