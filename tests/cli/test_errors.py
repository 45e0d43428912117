"""How the CLI fails: inputs that ONNX Runtime would choke on are one `error:` line and exit 2 before it runs;
an internal failure is one line naming the stage and the model, its traceback in a log file, and exit 1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from exporters.onnx import export_onnx
from surgery.errors import SurgeryError
from surgery.pipeline import open_model
from tests.families import FAMILIES

VOCAB = FAMILIES["llama"]["vocab_size"]


@pytest.fixture(scope="module")
def llama_onnx(tmp_path_factory, small_config) -> Path:
    """A small random-weight Llama exported to ONNX (input_ids, attention_mask; vocabulary from its config)."""
    captured = open_model(str(small_config("llama")))
    path = tmp_path_factory.mktemp("run") / "llama.onnx"
    export_onnx(captured.gm, captured.signature, path)
    return path


def _npz(folder: Path, name: str, **arrays: np.ndarray) -> Path:
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    return path


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 7))
MASK = np.ones((2, 7), dtype=np.int64)
OUT_OF_VOCAB = IDS.copy()
OUT_OF_VOCAB[1, 4] = VOCAB

BAD_INPUTS = {
    "3-D input_ids": ({"input_ids": IDS[None], "attention_mask": MASK}, r"input_ids has 3 dimensions .*takes 2"),
    "float input_ids": (
        {"input_ids": IDS.astype(np.float32), "attention_mask": MASK},
        r"input_ids is float32; the model takes int64",
    ),
    "no attention_mask": ({"input_ids": IDS}, r"no attention_mask"),
    "id past the vocabulary": (
        {"input_ids": OUT_OF_VOCAB, "attention_mask": MASK},
        rf"token id {VOCAB}; this model's vocabulary is 0\.\.{VOCAB - 1}",
    ),
}
MORE_BAD_INPUTS = {  # checked in-process: the same function, without a subprocess each
    "mask of another length": ({"input_ids": IDS, "attention_mask": MASK[:, :5]}, r"inputs must agree"),
    "unknown input name": (
        {"input_ids": IDS, "attention_mask": MASK, "token_type_ids": MASK},
        r"'token_type_ids' is not",
    ),
    "int32 attention_mask": ({"input_ids": IDS, "attention_mask": MASK.astype(np.int32)}, r"attention_mask is int32"),
    "negative id": ({"input_ids": -IDS - 1, "attention_mask": MASK}, r"token id -\d+;"),
}


@pytest.mark.slow
def test_good_inputs_run(llama_onnx, cli, tmp_path):
    run = cli("run", llama_onnx, "--input", _npz(tmp_path, "ok", input_ids=IDS, attention_mask=MASK), "--json")
    assert run.code == 0, run.stderr
    assert run.json["outputs"]["last_hidden_state"]["shape"] == [2, 7, FAMILIES["llama"]["hidden_size"]]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_before_onnx_runtime(llama_onnx, cli, tmp_path, case):
    arrays, message = BAD_INPUTS[case]
    run = cli("run", llama_onnx, "--input", _npz(tmp_path, "bad", **arrays), "-o", tmp_path / "out.npz")
    assert run.code == 2, (run.code, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --input"), run.stderr
    assert re.search(message, run.stderr), run.stderr
    assert "ONNXRuntimeError" not in run.stderr and not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("case", list(MORE_BAD_INPUTS))
def test_more_bad_inputs_are_refused_with_what_the_model_takes(llama_onnx, case):
    from exporters.inputs import check_feeds, graph_inputs, vocab_size
    from exporters.verify import ort_session

    arrays, message = MORE_BAD_INPUTS[case]
    inputs = graph_inputs(ort_session(llama_onnx))
    assert vocab_size(llama_onnx) == VOCAB
    with pytest.raises(SurgeryError, match=message):
        check_feeds(arrays, inputs, VOCAB, "--input x.npz")
    check_feeds({"input_ids": IDS, "attention_mask": MASK}, inputs, VOCAB, "--input x.npz")


@pytest.fixture(scope="module")
def inconsistent_config(tmp_path_factory) -> Path:
    """A Llama config.json that looks fine but cannot run: 4 attention heads over 3 key/value heads. transformers
    builds it; torch fails deep inside attention when the model first runs (at load, before capture)."""
    folder = tmp_path_factory.mktemp("bad-llama")
    config = {**FAMILIES["llama"], "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 3}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


@pytest.mark.slow
def test_internal_error_is_one_line_and_a_log_file(inconsistent_config, cli, tmp_path):
    run = cli("inspect", inconsistent_config, cwd=tmp_path)
    assert run.code == 1, (run.code, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    line = lines[0]
    assert line.startswith("error: internal error in surgery inspect (stage 'load and capture "), line
    assert f"model {inconsistent_config}" in line and "RuntimeError" in line
    log = Path(re.search(r"traceback in (\S+surgery-error-\S+\.log)", line).group(1))
    text = log.read_text()
    assert text.startswith(f"command: surgery inspect {inconsistent_config}") and "stage: load and capture" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError" in text
    log.unlink()


@pytest.mark.slow
def test_debug_shows_the_traceback(inconsistent_config, cli, tmp_path):
    run = cli("--debug", "inspect", inconsistent_config, cwd=tmp_path)
    assert run.code == 1
    assert "Traceback (most recent call last)" in run.stderr and "RuntimeError" in run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("traceback above")
    assert "surgery-error-" not in run.stderr
