"""`surgery count` and `surgery insert --method lora|parallel` as subprocesses: JSON, and bad input as one line,
exit 2."""

from __future__ import annotations

import pytest


def test_count_gpt3_175b_houlsby_r8(cli):
    run = cli("count", "gpt3-175b", "--method", "houlsby", "--r", "8", "--json")
    assert run.code == 0, run.stderr
    data = run.json
    assert data["trainable_params"] == 40_109_568 == 2 * 96 * (2 * 12288 * 8 + 12288 + 8) == data["formula_params"]
    assert data["pack_bytes"] == {"fp32": 4 * 40_109_568, "fp16": 2 * 40_109_568}
    assert data["sites"] == 192


@pytest.mark.slow  # a CLI start and a meta-device GPT-3 (10 s); make test keeps the JSON case above
def test_count_lora_per_projection_ranks_in_text(cli):
    run = cli("count", "gpt3-175b", "--method", "lora", "--r", "q=4,k=4,v=4,o=4")
    assert run.code == 0, run.stderr
    assert "37,748,736 trainable parameters (37.7M" in run.stdout and ": equal" in run.stdout


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_insert_lora(tmp_path, cli):
    run = cli(
        "insert",
        "--method",
        "lora",
        "--r",
        "8",
        "--targets",
        "q,v",
        "minilm",
        "-o",
        "lora.adapted.pt2",
        "--json",
        cwd=tmp_path,
    )
    assert run.code == 0, run.stderr
    assert run.json["r"] == {"q": 8, "v": 8} and run.json["trainable_params"] == 6 * 2 * 8 * (384 + 384)
    run = cli("inspect", "lora.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert "lora" in run.stdout and "12 adapted sites" in run.stdout


@pytest.mark.slow  # a CLI start and a MiniLM config (10 s); tests/surgery/test_count.py checks the count
def test_count_parallel_in_json(cli):
    run = cli("count", "minilm", "--method", "parallel", "--r", "16", "--scale", "4", "--json")
    assert run.code == 0, run.stderr
    assert run.json["adapter"]["scale"] == 4 and run.json["trainable_params"] == 6 * (2 * 384 * 16 + 384 + 16)


BAD = [
    pytest.param(
        ["insert", "--method", "lora", "--r", "q=0"], "q=0: a LoRA rank must be an integer >= 1", id="rank zero"
    ),
    pytest.param(  # it opens MiniLM first (17 s): make test-slow
        ["insert", "--method", "lora", "--targets", "q,x"],
        "no projection x",
        id="unknown projection",
        marks=pytest.mark.slow,
    ),
    pytest.param(["count", "gpt3-175b", "--method", "lora", "--r", "q=0"], ">= 1", id="count: rank zero"),
    pytest.param(["count", "nope.json"], "no such config", id="count: no config"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cli, args, message):
    run = cli(*args, cwd=tmp_path)
    assert run.code == 2, (run.stdout, run.stderr)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []
