"""The export-time bottleneck rewrite: exact against the unfused model, and applied only where it is exact."""

from __future__ import annotations

import collections
import copy
import dataclasses

import onnx
import pytest
import torch

from exporters.onnx import export_onnx
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.fuse import ConcatBottleneck as Concat
from surgery.fuse import FusedBottleneck, fuse_bottlenecks, fused_copy
from surgery.pipeline import adapt, open_model
from tests.conftest import fused_adapter_ops, make_adapted


def _outputs(captured, gm):
    tensors = captured.signature.examples({"batch": 3, "seq": 21}, seed=4, pad=True)
    with torch.no_grad():
        return captured.signature.call(gm, tensors)


def test_fused_copy_computes_the_adapted_model_and_leaves_it_untouched(minilm):
    adapt(minilm, AdapterSpec("houlsby", r=8, activation="gelu"))
    stand_in_weights(minilm.gm)
    bias_before = minilm.gm.get_parameter("encoder.layer.0.attention.output.dense.bias").clone()
    fused = fused_copy(minilm.gm)
    assert fused is not None
    kinds = collections.Counter(type(m).__name__ for m in fused.modules() if isinstance(m, (FusedBottleneck, Concat)))
    assert kinds == {"ConcatBottleneck": 6, "FusedBottleneck": 6}  # attention outputs (384 -> 384); feed-forwards
    assert "encoder.layer.0.attention.output.dense.weight" not in dict(fused.named_parameters())  # in the concat
    for want, got in zip(_outputs(minilm, minilm.gm), _outputs(minilm, fused)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert torch.equal(minilm.gm.get_parameter("encoder.layer.0.attention.output.dense.bias"), bias_before)


@pytest.mark.slow  # make test stays under 6 minutes; CI runs it in make test-slow
def test_reloaded_pt2_exports_fused_and_matches_torch(tmp_path, minilm_base):
    adapted = make_adapted(minilm_base, tmp_path, 8)
    result = export_onnx(adapted.gm, adapted.signature, tmp_path / "m.onnx", manifest=adapted.manifest)
    assert result.parity.max_abs_diff < 1e-4
    graph = onnx.load(str(result.path)).graph
    # the 6 feed-forward outputs: down (Gemm), up (MatMul, then Add); the 6 attention outputs with their projection:
    # z (Gemm), then [a | σ(z)] (Concat) times [W ; W_up] (Gemm); the attention output's MatMul is gone
    assert fused_adapter_ops(graph) == {"Gemm": 6 + 12, "MatMul": 6}
    ops = collections.Counter(n.op_type for n in graph.node)
    assert ops["Gemm"] == 18 + 1 and ops["MatMul"] == 48 - 6 + 6  # the pooler; the base's 48 less 6 projections


def test_projections_without_bias_fuse_with_the_up_bias_as_a_unit_rank(small_config):
    base = open_model(str(small_config("llama")))  # o_proj, down_proj: no bias
    for activation in ("relu", "gelu"):  # σ(1) = 1, and σ(1) = 0.84, which scales the unit row
        captured = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
        adapt(captured, AdapterSpec("houlsby", r=4, activation=activation))
        stand_in_weights(captured.gm, seed=5)
        fused = fused_copy(captured.gm)
        assert fused is not None
        modules = [m for m in fused.modules() if isinstance(m, FusedBottleneck)]
        assert len(modules) == 2 and all(m.up_w.shape[0] == 5 for m in modules)  # down_proj: rank 4 and the unit rank
        concats = [m for m in fused.modules() if isinstance(m, Concat)]
        assert len(concats) == 2 and all(m.wcat.shape == (64 + 4, 64) for m in concats)  # o_proj, without a bias
        for want, got in zip(_outputs(captured, captured.gm), _outputs(captured, fused)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=lambda m: f"{activation}: {m}")
        assert fused_copy(captured.gm, kernel=True) is None  # the one-op kernel keeps its rank: left as it is


@pytest.mark.slow  # make test stays under 6 minutes; CI runs it in make test-slow
def test_projections_without_bias_export_as_two_matmuls_per_adapter(tmp_path, small_config):
    adapted = make_adapted(open_model(str(small_config("llama"))), tmp_path, 4)
    result = export_onnx(adapted.gm, adapted.signature, tmp_path / "l.onnx", manifest=adapted.manifest)
    assert result.parity.max_abs_diff < 1e-4
    graph = onnx.load(str(result.path)).graph
    assert fused_adapter_ops(graph) == {"Gemm": 2 + 4, "MatMul": 2}  # down_proj's fused; o_proj's with the concat
    assert not [n for n in graph.node if any(".up_b" in i for i in n.input)], "the up-bias rides in the up GEMM"


def test_gpt2_conv1d_projections_fuse(small_config):
    captured = open_model(str(small_config("gpt2")))
    adapt(captured, AdapterSpec("pfeiffer", r=4))
    stand_in_weights(captured.gm)
    reference = _outputs(captured, captured.gm)
    gm = copy.deepcopy(captured.gm)
    assert fuse_bottlenecks(gm) == 2
    for want, got in zip(reference, _outputs(captured, gm)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow  # 10-12 s of export and reload: make test-slow (make test keeps under 6 minutes)
def test_kernel_form_matches_and_survives_export_and_reload(tmp_path, small_config):
    """The one-op form (`surgery::bottleneck`; its CPU implementation here) computes the adapted model, and a
    program exported with it saves, reloads and runs."""
    from surgery.capture import export_program
    from surgery.fuse import KernelBottleneck

    adapted = make_adapted(open_model(str(small_config("gpt2"))), tmp_path, 4)
    gm = fused_copy(adapted.gm, adapted.manifest, kernel=True)
    assert sum(isinstance(m, KernelBottleneck) for m in gm.modules()) == 4
    reference = _outputs(adapted, adapted.gm)
    for want, got in zip(reference, _outputs(adapted, gm)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    program = export_program(gm, adapted.signature, "kernel form")
    assert sum(n.target is torch.ops.surgery.bottleneck.default for n in program.graph.nodes) == 4
    torch.export.save(program, tmp_path / "k.pt2")
    for want, got in zip(reference, _outputs(adapted, torch.export.load(tmp_path / "k.pt2").module())):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_kernel_form_on_cuda_matches_the_cpu_model(tmp_path, small_config):
    """GPT-2 (small config) with Houlsby adapters: the fused Triton kernels on CUDA against the unfused model on CPU."""
    from torch.export.passes import move_to_device_pass

    from surgery.capture import export_program

    adapted = make_adapted(open_model(str(small_config("gpt2"))), tmp_path, 4)
    gm = fused_copy(adapted.gm, adapted.manifest, kernel=True)
    on_gpu = move_to_device_pass(export_program(gm, adapted.signature, "kernel form"), "cuda").module()
    tensors = adapted.signature.examples({"batch": 3, "seq": 21}, seed=4, pad=True)
    with torch.no_grad():
        want = adapted.signature.call(adapted.gm, tensors)
        got = adapted.signature.call(on_gpu, [t.cuda() for t in tensors])
    for w, g in zip(want, got):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-4, atol=1e-4)
