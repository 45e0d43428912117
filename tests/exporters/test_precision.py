"""--dtype: models, adapters, packs and ONNX exports in fp16 and bf16, checked against torch at the same precision
within the measured default tolerances (surgery/parity.py HALF_TOLERANCES); bf16 runs on ORT's CPU as its fp32 copy."""

from __future__ import annotations

import onnx
import pytest
import torch

from exporters.onnx import export_onnx
from exporters.runtime import AdaptedSession
from exporters.swappable import export_swappable
from exporters.verify import check_onnx, ort_session
from surgery.adapters import AdapterSpec, LoraSpec, stand_in_weights
from surgery.errors import SurgeryError
from surgery.packs import pack_from_model
from surgery.parity import tolerances, weights_dtype
from surgery.pipeline import adapt, open_model, stand_in_adapted
from surgery.sites import ADAPTER_ROOT

ONNX_TYPES = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}


@pytest.fixture(scope="module")
def llama(small_config):
    return small_config("llama")


@pytest.mark.parametrize(
    "dtype, torch_dtype",
    [
        pytest.param("bf16", torch.bfloat16, marks=pytest.mark.slow),
        pytest.param("fp16", torch.float16, marks=pytest.mark.slow),
    ],
)
def test_half_export_is_half_and_matches_torch(tmp_path, llama, dtype, torch_dtype):
    captured = open_model(str(llama), dtype=dtype)
    adapt(captured, LoraSpec.parse("4"))
    stand_in_weights(captured.gm, seed=2)
    adapters = [p for n, p in captured.gm.named_parameters() if n.startswith(ADAPTER_ROOT + ".")]
    assert weights_dtype(captured.gm) == torch_dtype and {p.dtype for p in adapters} == {torch_dtype}
    atol, rtol = tolerances(torch_dtype)
    result = export_onnx(captured.gm, captured.signature, tmp_path / "m.onnx", tolerance=atol, rtol=rtol)
    assert result.parity.ok
    model = onnx.load(str(result.path))
    big = [i for i in model.graph.initializer if len(i.dims) == 2]
    assert big and {i.data_type for i in big} == {ONNX_TYPES[torch_dtype]}  # the weights are stored in half
    assert model.graph.output[0].type.tensor_type.elem_type == ONNX_TYPES[torch_dtype]
    # a corrupted weight (one projection of the last layer x 2) is caught at the same tolerances
    target = [i for i in big if 1000 not in i.dims][-1]  # not the embedding (vocab 1000): RMSNorm would undo it
    array = onnx.numpy_helper.to_array(target).astype("float32") * 2.0
    target.CopyFrom(onnx.helper.make_tensor(target.name, target.data_type, target.dims, array.flatten().tolist()))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    assert not check_onnx(tmp_path / "bad.onnx", captured.gm, captured.signature, tolerance=atol, rtol=rtol).ok


@pytest.mark.slow
def test_bf16_runs_on_the_cpu_as_its_fp32_copy(tmp_path, llama):
    captured = open_model(str(llama), dtype="bf16")
    path = tmp_path / "m.onnx"
    export_onnx(captured.gm, captured.signature, path, tolerance=1e-2, rtol=5e-2)
    session = ort_session(path)
    assert session.get_outputs()[0].type == "tensor(float)"  # the copy computes in fp32, from the bf16 weights
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):  # what ORT's CPU provider does with the file itself
        import onnxruntime as ort

        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_fp16_swappable_takes_a_pack_in_the_model_dtype(tmp_path, llama):
    base = open_model(str(llama), dtype="fp16")
    adapted = stand_in_adapted(base, AdapterSpec("houlsby", r=4), tmp_path / "a.adapted.pt2", seed=1)
    assert weights_dtype(adapted.gm) == torch.float16
    atol, rtol = tolerances(torch.float16)
    result = export_swappable(adapted, tmp_path / "a.swappable.onnx", tolerance=atol, rtol=rtol)
    assert result.pack_parity.ok and result.base_parity.ok
    session = AdaptedSession(result.path)
    assert session.dtype == "float16"  # the runtime names dtypes as numpy does
    pack = pack_from_model(adapted.gm.state_dict(), adapted.manifest)
    assert {t.dtype for t in pack.tensors.values()} == {torch.float16}
    session.load("own", pack)


def test_dtype_of_a_captured_program_is_not_changed(tiny_pt2):
    with pytest.raises(SurgeryError, match="--dtype bf16 applies when a model is captured"):
        open_model(str(tiny_pt2), dtype="bf16")
    assert weights_dtype(open_model(str(tiny_pt2), dtype="fp32").gm) == torch.float32
    with pytest.raises(SurgeryError, match="--dtype fp8: choose auto, fp32, fp16, bf16"):
        open_model(str(tiny_pt2), dtype="fp8")
