"""The runtime installed alone: `pip install` of this repository without the export extra, into a fresh venv, then
`surgery run` and `surgery generate` there on exports made here, held to torch and transformers in this environment.

Slow: it builds the package and installs numpy, onnxruntime, onnx, safetensors, tokenizers, typer and rich (from the
package index or the local wheels pip is configured with).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import _pytree as pytree

from exporters.swappable import export_swappable
from surgery.adapters import AdapterSpec
from surgery.packs import pack_from_model, save_pack
from surgery.parity import compare
from surgery.pipeline import open_model, stand_in_adapted
from tests.families import write_config
from tests.lm_reference import hf_generate, hf_model

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "runtime", "surgery", "exporters", "cli", "benchmarks")
PROMPT = [8, 250, 31, 600, 2]
NEW = 8


def _env() -> dict[str, str]:
    """This process's environment without its Python paths: the venv sees only what it installed."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "COLUMNS": "200"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with this repository installed as a user would install the runtime: `pip install surgery`."""
    work = tmp_path_factory.mktemp("runtime-install")
    src = work / "src"  # a copy: pip builds in the source folder
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True, timeout=300)
    pip = subprocess.run(
        [str(work / "venv" / "bin" / "pip"), "install", "--quiet", str(src)],
        capture_output=True, text=True, env=_env(), timeout=900,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr[-3000:]
    return work / "venv"


def _surgery(venv: Path, *args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "surgery"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=_env(),
        timeout=600,
    )


@pytest.mark.slow
def test_the_venv_holds_the_runtime_and_neither_torch_nor_transformers(venv, tmp_path):
    probe = (
        "import importlib.util as u, runtime, cli.main; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=_env()
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    for command in (["insert", "minilm", "--r", "4"], ["export", "m.adapted.pt2", "--swappable"]):
        refused = _surgery(venv, *command, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        line = refused.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line, line
        assert f"surgery {command[0]} needs torch and transformers" in line and "surgery[export]" in line, line


@pytest.mark.slow
def test_surgery_run_in_the_runtime_alone_matches_torch_with_a_safetensors_pack(venv, tmp_path):
    base = open_model(str(write_config("bert", tmp_path / "bert")))
    spec = AdapterSpec("houlsby", r=4)
    models = [stand_in_adapted(base, spec, tmp_path / f"m{k}.adapted.pt2", seed=k, weights_seed=20 + k) for k in (0, 1)]
    export_swappable(models[0], tmp_path / "m.swappable.onnx")
    save_pack(pack_from_model(models[1].gm.state_dict(), models[1].manifest), tmp_path / "p1.safetensors")
    signature = models[1].signature
    tensors = signature.examples({"batch": 2, "seq": 7}, seed=4, pad=True)
    np.savez(tmp_path / "in.npz", **{n: t.numpy() for n, t in zip(signature.names, tensors)})
    with torch.no_grad():
        want = [t.numpy() for t in pytree.tree_leaves(signature.call(models[1].gm, tensors))]
        base_want = [t.numpy() for t in pytree.tree_leaves(signature.call(base.gm, tensors))]
    mask = tensors[signature.names.index("attention_mask")].numpy()

    for pack, reference in (("p1.safetensors", want), (None, base_want)):
        args = ["--adapter", pack] if pack else []
        done = _surgery(venv, "run", "m.swappable.onnx", *args, "--input", "in.npz", "--save", "out.npz", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        with np.load(tmp_path / "out.npz") as out:
            got = [out[k] for k in out.files]
        parity = compare(reference, got, mask=mask, where=f"surgery run, pack {pack}")
        assert parity.ok, parity.summary()
    assert not np.allclose(want[0], base_want[0], atol=1e-3), "the pack must change the outputs"


@pytest.fixture
def word_tokenizer(tmp_path) -> Path:
    """A tokenizer.json over the tiny vocabulary (w0 ... w999)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    return tmp_path / "tok"


@pytest.mark.slow
def test_surgery_generate_in_the_runtime_alone_gives_transformers_greedy_tokens(
    venv, lm_base, lm_config, word_tokenizer, tmp_path
):
    base = lm_base("llama")
    spec = AdapterSpec("houlsby", r=4)
    models = [
        stand_in_adapted(base, spec, tmp_path / f"lm{k}.adapted.pt2", seed=k, weights_seed=60 + k) for k in (0, 1)
    ]
    export_swappable(models[0], tmp_path / "lm.swappable.onnx")
    save_pack(pack_from_model(models[1].gm.state_dict(), models[1].manifest), tmp_path / "p1.onnx_adapter")
    want, _ = hf_generate(hf_model(lm_config("llama"), models[1]), PROMPT, NEW)
    base_want, _ = hf_generate(hf_model(lm_config("llama"), base), PROMPT, NEW)
    assert want != base_want, "the pack must change the tokens"
    prompt = " ".join(f"w{i}" for i in PROMPT)

    for pack, reference in (("p1.onnx_adapter", want), (None, base_want)):
        args = ["--adapter", pack] if pack else []
        done = _surgery(
            venv, "generate", "lm.swappable.onnx", "--tokenizer", word_tokenizer, "--prompt", prompt, *args,
            "--max-new-tokens", NEW, "--json", cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["prompt_tokens"] == len(PROMPT) and data["tokens"][0] == reference, (pack, data)
        assert data["text"].split() == [f"w{t}" for t in reference]
