"""`surgery export --trt`, `check-trt`, `swap` and `run ENGINE` as subprocesses. Without TensorRT (as here) the
export writes the TensorRT-ready ONNX and the trtexec command, then exits 2 with the install command."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the export builds the engine instead")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cli):
    folder = tmp_path_factory.mktemp("trt_cli")
    run = cli("insert", "--r", "8", "minilm", cwd=folder)
    assert run.code == 0, run.stderr
    return folder


@no_trt
@pytest.mark.slow  # a CLI export of MiniLM; the TensorRT ONNX and its checks are tested in-process in make test
def test_export_trt_without_tensorrt_writes_onnx_and_trtexec_then_exits_2(folder, cli):
    run = cli(
        "export",
        "minilm.adapted.pt2",
        "--trt",
        "-o",
        "m.plan",
        "--fp16",
        "--engine-shape",
        "batch=1:8:64,seq=16:128:512",
        "--triton-repo",
        "repo",
        cwd=folder,
    )
    assert run.code == 2, run.stderr
    error = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(error) == 1 and "TensorRT is not installed" in error[0] and "pip install 'surgery[trt]'" in error[0]
    command = next(line for line in run.stdout.splitlines() if line.startswith("trtexec "))
    args = shlex.split(command)
    assert "--onnx=m.onnx" in args and "--saveEngine=m.plan" in args and "--fp16" in args
    assert (
        "--minShapes=input_ids:1x16,attention_mask:1x16" in args
        and "--optShapes=input_ids:8x128,attention_mask:8x128" in args
    )
    assert "--maxShapes=input_ids:64x512,attention_mask:64x512" in args and "--timingCacheFile=timing.cache" in args
    assert (
        (folder / "m.onnx").is_file() and (folder / "m.plan.trtexec.sh").is_file() and not (folder / "m.plan").exists()
    )
    assert (folder / "repo" / "m" / "1" / "model.onnx").is_file() and 'platform: "onnxruntime_onnx"' in (
        folder / "repo" / "m" / "config.pbtxt"
    ).read_text()
    check = cli("check-trt", "m.onnx", "--json", cwd=folder)
    assert check.code == 0, check.stdout + check.stderr
    assert check.json["clean"] and check.json["checked_against"]["tensorrt"] == "10.15"


@no_trt
@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_export_refittable_without_tensorrt_json(folder, cli):
    run = cli(
        "export", "minilm.adapted.pt2", "--trt", "--swappable", "--max-r", "16", "-o", "r.plan", "--json", cwd=folder
    )
    assert run.code == 2, run.stderr
    data = run.json
    assert data["engine_built"] is False and data["max_r"] == 16 and data["onnx"] == "r.refit.onnx"
    assert "--refit" in shlex.split(data["trtexec"]) and data["max_abs_diff"] < 1e-4
    assert data["profile"]["input_ids"] == {"min": [1, 2], "opt": [1, 128], "max": [64, 512]}
    assert (folder / "r.refit.onnx").is_file() and not (folder / "r.plan").exists()


@no_trt
@pytest.mark.slow  # an insert and an export of the tiny LM as subprocesses
def test_export_trt_of_a_cache_graph_has_a_prefill_and_a_decode_profile(lm_config, cli, tmp_path):
    run = cli("insert", "--r", "4", lm_config("llama"), "-o", "lm.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli(
        "export", "lm.adapted.pt2", "--trt", "-o", "lm.plan", "--engine-shape", "batch=1:2:4",
        "--engine-shape", "prefill:seq=1:32:64", "--engine-shape", "decode:past=1:32:128", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert run.code == 2, run.stderr
    profiles = run.json["profiles"]
    assert list(profiles) == ["prefill", "decode"] and run.json["max_abs_diff"] < 1e-4
    assert profiles["prefill"]["past_key_values.0.key"] == {
        "min": [1, 2, 0, 16],
        "opt": [2, 2, 0, 16],
        "max": [4, 2, 0, 16],
    }
    assert profiles["decode"]["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}
    assert profiles["decode"]["attention_mask"]["max"] == [4, 129]
    assert (
        shlex.split(run.json["trtexec"]).count(
            "--minShapes=" + ",".join(f"{n}:{'x'.join(map(str, t['min']))}" for n, t in profiles["decode"].items())
        )
        == 1
    )
    bad = cli("export", "lm.adapted.pt2", "--trt", "--engine-shape", "decode:seq=1:2:4", cwd=tmp_path)
    assert bad.code == 2 and "the decode profile takes one new token (seq 1)" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "lm.plan").exists()


SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "minilm.adapted.pt2", "--fp16"], "add --trt"),
        # the rest in make test-slow: a CLI start each (about 6 s), make test keeps under 6 minutes
        pytest.param(["export", "minilm.adapted.pt2", "--trt", "--swappable"], "--swappable and --max-r", marks=SLOW),
        pytest.param(["export", "minilm.adapted.pt2", "--trt", "--fp16", "--bf16"], "choose one", marks=SLOW),
        (["export", "minilm.adapted.pt2", "--trt", "--engine-shape", "batch=1:2"], "MIN:OPT:MAX"),
        pytest.param(
            ["export", "minilm.adapted.pt2", "--swappable", "--triton-repo", "minilm.adapted.pt2"],
            "is not a folder",
            marks=SLOW,
        ),
        (["swap", "none.plan", "p.safetensors"], "no such engine file"),
        pytest.param(["run", "none.plan"], "no such file", marks=SLOW),
        pytest.param(["check-trt", "none.onnx"], "no such ONNX file", marks=SLOW),
    ],
)
def test_bad_trt_options_exit_2_with_one_line(folder, cli, args, message):
    run = cli(*args, cwd=folder)
    assert run.code == 2, (run.stdout, run.stderr)
    assert message in run.stderr and "Traceback" not in run.stderr


def test_check_trt_flags_an_unsupported_operator(tmp_path, cli):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"], name="u")], "g", [x], [y])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(tmp_path / "u.onnx"))
    run = cli("check-trt", "u.onnx", cwd=tmp_path)
    assert run.code == 1 and "Unique is not supported" in run.stdout
    assert json.loads(cli("check-trt", "u.onnx", "--json", cwd=tmp_path).stdout)["findings"][0]["where"] == "u"
