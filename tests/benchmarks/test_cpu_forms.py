"""benchmarks/cpu_forms.py: every ONNX form of a baked Houlsby export computes the export's outputs in ONNX Runtime,
has the structure it names, and a form that computes something else is refused before any timing."""

from __future__ import annotations

import collections

import onnx
import pytest

from benchmarks import cpu_forms
from exporters.onnx import export_onnx
from surgery.errors import SurgeryError
from surgery.pipeline import open_model
from tests.conftest import make_adapted

pytestmark = pytest.mark.slow  # two exports of a small BERT and five ORT sessions: benchmark code, slow tier


@pytest.fixture(scope="module")
def forms(tmp_path_factory, small_config):
    work = tmp_path_factory.mktemp("forms")
    base = open_model(str(small_config("bert")))
    adapted = make_adapted(base, work, 4)  # 4 bottlenecks (2 layers x 2 sites), distinct random weights
    export_onnx(base.gm, base.signature, work / "base.onnx")
    export_onnx(adapted.gm, adapted.signature, work / "houlsby.onnx", manifest=adapted.manifest)
    cpu_forms.export_unconcatenated(work / "m4_0.adapted.pt2", work / "unconcat.onnx")
    return work, cpu_forms.write_forms(work / "houlsby.onnx", work / "unconcat.onnx", work / "base.onnx", work)


def ops(path, reading=""):
    graph = onnx.load(str(path)).graph
    return collections.Counter(n.op_type for n in graph.node if any(reading in i for i in n.input))


def test_every_form_matches_the_export_and_has_its_structure(forms):
    _, paths = forms  # write_forms ran each in ORT against the export: within tolerance, and not the base
    assert list(paths) == list(cpu_forms.FORMS)
    assert ops(paths["fused"], ".up_w") == {"MatMul": 4}
    assert ops(paths["gemm-c"], ".up_w") == {"Gemm": 4}
    assert ops(paths["flat"], ".down_w") == {"MatMul": 4}
    assert ops(paths["flat"])["Reshape"] < ops(paths["fused"])["Reshape"]
    # kcat on the two attention outputs, not the feed-forwards: what `export` writes, made at the ONNX level
    assert ops(paths["kcat"])["Concat"] - ops(paths["fused"])["Concat"] == 2
    assert ops(paths["kcat"], "wz") == ops(paths["export"], ".wz") == ops(paths["export"], ".wcat") == {"Gemm": 2}
    for form in ("kcat", "export"):
        assert ops(paths[form], ".down_w") == {"Gemm": 2} and ops(paths[form], ".up_w") == {"MatMul": 2}, form


def test_a_form_that_computes_something_else_is_refused(forms, monkeypatch):
    work, _ = forms
    real = cpu_forms.rewrite

    def wrong(model, form):  # the kcat form with its bottleneck's activation dropped
        model = real(model, form)
        for n in model.graph.node:
            if n.output[0].endswith(".h"):
                n.op_type = "Identity"
        return model

    monkeypatch.setattr(cpu_forms, "rewrite", wrong)
    with pytest.raises(SurgeryError, match="form kcat"):
        cpu_forms.write_forms(work / "houlsby.onnx", work / "unconcat.onnx", work / "base.onnx", work, ("kcat",))
