"""`surgery merge` as a subprocess: merge/unmerge, --stack, --average with JSON; refusals as one line, exit 2."""

from __future__ import annotations

import pytest

from surgery.adapters import AdapterSpec, LoraSpec
from surgery.bundle import save_adapted
from surgery.pipeline import open_model
from tests.surgery.test_merge import _adapted


@pytest.fixture(scope="module")
def models(tmp_path_factory, minilm_base, small_config):
    """Adapted models written with the library (faster than the CLI), one folder for the module."""
    folder = tmp_path_factory.mktemp("merge")
    gpt2 = open_model(str(small_config("gpt2")))
    cases = {
        "lora8": (minilm_base, LoraSpec({"q": 8, "v": 8}), 1),
        "lora8b": (minilm_base, LoraSpec({"q": 8, "v": 8}, alpha=16), 2),
        "houlsby": (minilm_base, AdapterSpec("houlsby", r=8), 4),
        "gpt2": (gpt2, LoraSpec({"q": 8, "v": 8}), 5),
    }
    for name, (base, spec, seed) in cases.items():
        captured, report = _adapted(base, spec, seed)
        save_adapted(folder / f"{name}.adapted.pt2", captured, spec, report)
    return folder


def _manifest(path):
    """The manifest of a .pt2, read from the archive without loading the program."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("/extra/surgery.json"))))


@pytest.mark.slow  # make test stays under 6 minutes; CI runs it in make test-slow
def test_merge_then_unmerge(models, cli):
    run = cli("merge", "lora8.adapted.pt2", "-o", "merged.pt2", "--json", cwd=models)
    assert run.code == 0, run.stderr
    data = run.json
    assert data["merged"] == 12 and data["kinds"] == ["lora"]
    assert data["output_max_abs_diff"] < 1e-5 and data["unmerge_max_abs_diff"] < 1e-6
    manifest = _manifest(models / "merged.pt2")
    assert (
        manifest["merged"]["merged"] == 12 and manifest["source"]["name"] == "minilm"
    )  # the base, not lora8.adapted.pt2
    run = cli("merge", "merged.pt2", "--unmerge", "-o", "back.adapted.pt2", "--json", cwd=models)
    assert run.code == 0, run.stderr
    assert run.json["sites"] == 12 and run.json["trainable_params"] == 6 * 2 * 8 * 768


@pytest.mark.slow  # a CLI chain of several subprocesses; the library tests cover its parts in make test
def test_stack_and_average(models, cli):
    run = cli(
        "merge", "houlsby.adapted.pt2", "lora8.adapted.pt2", "--stack", "-o", "ab.adapted.pt2", "--json", cwd=models
    )
    assert run.code == 0, run.stderr
    assert run.json["sites"] == 24 and [p["method"] for p in run.json["adapter"]["parts"]] == ["houlsby", "lora"]
    run = cli(
        "merge",
        "lora8.adapted.pt2",
        "lora8b.adapted.pt2",
        "--average",
        "0.7,0.3",
        "-o",
        "avg.adapted.pt2",
        "--json",
        cwd=models,
    )
    assert run.code == 0, run.stderr
    assert run.json["adapter"]["r"] == {"q": 16, "v": 16} and "exact" in run.json["average"]["how"]


BAD = [
    ("nonlinear bottleneck", ["merge", "houlsby.adapted.pt2", "-o", "x.pt2"], "nonlinear"),
    (
        "stack different bases",
        ["merge", "lora8.adapted.pt2", "gpt2.adapted.pt2", "--stack", "-o", "x.pt2"],
        "different base models",
    ),
    (
        "average different methods",
        ["merge", "lora8.adapted.pt2", "houlsby.adapted.pt2", "--average", "0.5,0.5", "-o", "x.pt2"],
        "different methods",
    ),
    (
        "average weight count",
        ["merge", "lora8.adapted.pt2", "lora8b.adapted.pt2", "--average", "1", "-o", "x.pt2"],
        "one weight per model",
    ),
]
# Averaging different shapes, and --unmerge of a model that is not merged: tests/surgery/test_merge.py.


@pytest.mark.parametrize(
    "args, message",
    [pytest.param(*b[1:], id=b[0], marks=() if i == 0 else pytest.mark.slow) for i, b in enumerate(BAD)],
)  # one refusal in make test, all of them in make test-slow
def test_refusals_are_one_line_exit_2_and_nothing_written(models, cli, args, message):
    before = sorted(p.name for p in models.iterdir())
    run = cli(*args, cwd=models)
    assert run.code == 2, (run.stdout, run.stderr)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in models.iterdir()) == before
