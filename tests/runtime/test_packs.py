"""The runtime reads packs with numpy alone: bf16 as its uint16 bits, handed to ONNX Runtime with its ONNX type.
Every value is held to torch's own reading and rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runtime.packs import META_KEY, as_numpy, dtype_name, load_pack, write_onnx_adapter
from runtime.errors import SurgeryError
from surgery.packs import Pack, save_pack
from surgery.packs import load_pack as load_torch_pack

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"adapters.a.down_w": torch.randn(6, 3, generator=g), "adapters.a.up_b": torch.randn(6, generator=g)}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_safetensors_pack_reads_as_numpy_with_torchs_values(dtype, tmp_path):
    tensors = {n: t.to(DTYPES[dtype]) for n, t in _tensors().items()}
    path = tmp_path / "p.safetensors"
    save_file(tensors, str(path), metadata={META_KEY: json.dumps({"format": 1, "fingerprint": 7, "r": 3})})
    pack = load_pack(path)
    assert pack.fingerprint == 7 and pack.meta == {"r": 3} and pack.rank == 3
    for name, want in tensors.items():
        got = pack.tensors[name]
        assert isinstance(got, np.ndarray) and dtype_name(got) == dtype and got.shape == tuple(want.shape)
        np.testing.assert_array_equal(as_numpy(got, "float32"), want.float().numpy())  # bf16 -> fp32 is exact
    back = load_torch_pack(path)  # the exporter's reading goes through the runtime's
    for name, want in tensors.items():
        assert back.tensors[name].dtype == want.dtype and torch.equal(back.tensors[name], want)


def test_fp32_to_bf16_rounds_as_torch_does():
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4096, generator=g) * 10 ** torch.randint(-6, 6, (4096,), generator=g)])
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-126 * 1.5])  # halfway cases: to even
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, float("inf"), -float("inf")])])
    bits = as_numpy(x.numpy(), "bfloat16")
    assert bits.dtype == np.uint16
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)
    nan = as_numpy(np.array([np.nan], dtype=np.float32), "bfloat16")
    assert np.isnan(as_numpy(nan, "float32")).all()


def test_bf16_onnx_adapter_is_written_with_its_onnx_type_and_read_back_as_its_bits(tmp_path):
    import onnxruntime as ort

    want = _tensors()["adapters.a.down_w"].to(torch.bfloat16)
    bits = want.view(torch.int16).numpy().view(np.uint16)
    path = write_onnx_adapter({"adapters.a.down_w": bits}, 11, tmp_path / "p.onnx_adapter")
    read = ort.AdapterFormat.read_adapter(str(path))
    value = read.get_parameters()["adapters.a.down_w"]
    assert value.data_type() == "tensor(bfloat16)" and value.shape() == [6, 3] and read.get_model_version() == 11
    pack = load_pack(path)
    np.testing.assert_array_equal(pack.tensors["adapters.a.down_w"], bits)
    assert torch.equal(load_torch_pack(path).tensors["adapters.a.down_w"], want)
    again = save_pack(Pack({"adapters.a.down_w": want}, 11), tmp_path / "q.onnx_adapter")  # the exporter's writer
    np.testing.assert_array_equal(load_pack(again).tensors["adapters.a.down_w"], bits)


def test_a_damaged_onnx_adapter_is_one_line(tmp_path):
    path = tmp_path / "p.onnx_adapter"
    path.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(SurgeryError, match="not a readable .onnx_adapter"):
        load_pack(path)
