"""Speech models from small configs (tests/families.py): wav2vec2 and HuBERT take raw audio (`input_values`, the
samples axis dynamic, no attention mask), Whisper takes log-mel frames (`input_features`, fixed at twice
`max_source_positions`) and the decoder's ids (`decoder_input_ids`, given).

Houlsby adapters with distinct random weights are inserted by default; the baked ONNX export is run by ONNX Runtime
on shapes other than the captured ones and compared with the Hugging Face module whose site modules carry the same
adapters as forward hooks (an independent placement), on unpadded batches."""

from __future__ import annotations

import copy
import json
import re
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.architectures import ATTN_OUT, CROSS_OUT, FFN_OUT
from surgery.capture import capture
from surgery.graph import adapter_target
from surgery.load import load
from surgery.pipeline import adapt
from surgery.signature import Signature
from tests.families import FAMILIES, write_config

R = 4
AUDIO_SITES = [
    (f"encoder.layers.{i}.{p}", role)
    for i in range(2)
    for p, role in (("attention.out_proj", ATTN_OUT), ("feed_forward.output_dense", FFN_OUT))
]
WHISPER_SITES = [
    (f"encoder.layers.{i}.{p}", role)
    for i in range(2)
    for p, role in (("self_attn.out_proj", ATTN_OUT), ("fc2", FFN_OUT))
] + [
    (f"decoder.layers.{i}.{p}", role)
    for i in range(2)
    for p, role in (("self_attn.out_proj", ATTN_OUT), ("encoder_attn.out_proj", CROSS_OUT), ("fc2", FFN_OUT))
]


@dataclasses.dataclass
class Exported:
    module: torch.nn.Module  # the Hugging Face model, adapters hooked on the site modules' outputs
    hooks: list  # the hooks' handles
    sites: list[tuple[str, str]]
    onnx: Path


def exported(model_type: str, folder: Path) -> Exported:
    """Insert Houlsby r=4 by default, give the adapters distinct random weights, hook the same adapters on the HF
    module, export baked ONNX (the exporter checks it against torch)."""
    from exporters.onnx import export_onnx

    loaded = load(str(write_config(model_type, folder)))
    captured = capture(loaded)
    adapted = dataclasses.replace(captured, gm=copy.deepcopy(captured.gm))
    report = adapt(adapted, AdapterSpec("houlsby", r=R), seed=1)
    stand_in_weights(adapted.gm, seed=7)
    module = loaded.module
    hooks = [
        module.get_submodule(s.path).register_forward_hook(
            lambda m, i, out, a=adapted.gm.get_submodule(adapter_target(s)): a(out)
        )
        for s in report.sites
    ]
    path = folder / "model.onnx"
    export_onnx(adapted.gm, adapted.signature, path)
    return Exported(module, hooks, [(s.path, s.role) for s in report.sites], path)


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def hf_run(model: Exported, feeds: dict[str, np.ndarray], hooked: bool = True) -> list[np.ndarray]:
    """The HF module's outputs (tensors, in order) on `feeds`; `hooked=False`: the base model (hooks removed)."""
    from torch.utils import _pytree as pytree

    if not hooked:
        for h in model.hooks:
            h.remove()
    with torch.no_grad():
        out = model.module(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=False)
    return [t.numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_close(got: list[np.ndarray], want: list[np.ndarray], base: list[np.ndarray] | None = None) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)
    if base is not None:  # the adapters do something a check can see
        assert np.abs(want[0] - base[0]).max() > 1e-2


AUDIO = [pytest.param("wav2vec2"), pytest.param("hubert", marks=pytest.mark.slow)]


@pytest.mark.parametrize("model_type", AUDIO)
def test_raw_audio_encoders_take_any_length(model_type, tmp_path):
    """Two sites per encoder block after the convolutional front end; unpadded batches of three lengths (one a
    frame's worth past the shortest, none a multiple of the front end's stride) against the hooked HF model."""
    import onnx

    model = exported(model_type, tmp_path)
    assert model.sites == AUDIO_SITES
    graph = onnx.load(str(model.onnx)).graph
    dims = [[d.dim_param for d in v.type.tensor_type.shape.dim] for v in (graph.input[0], graph.output[0])]
    assert dims[0] == ["batch", "samples"]  # the axis's name, not torch's symbol
    assert dims[1][0] == "batch" and "samples" in dims[1][1] and not re.search(r"\bs\d+", dims[1][1])
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 81)), rng.standard_normal((3, 1234)), rng.standard_normal((2, 4007))]
    outputs = []
    for x in batches:
        feeds = {"input_values": x.astype(np.float32)}
        got = ort_run(model.onnx, feeds)
        outputs.append((feeds, got, hf_run(model, feeds)))
    assert [o[1][0].shape[1] for o in outputs] == [3, 60, 199]  # frames: the front end's length formula
    for feeds, got, want in outputs:
        assert_close(got, want, hf_run(model, feeds, hooked=False))


def test_whisper_against_the_models_forward_on_given_decoder_ids(tmp_path):
    """Two sites per encoder block, three per decoder block; features of the fixed frame count and decoder ids of
    two lengths, against the hooked HF model's forward on the same decoder ids."""
    model = exported("whisper", tmp_path)
    assert model.sites == WHISPER_SITES
    row = FAMILIES["whisper"]
    rng = np.random.default_rng(1)
    checks = []
    for batch, seq in ((3, 7), (1, 40)):
        frames = rng.standard_normal((batch, row["num_mel_bins"], 2 * row["max_source_positions"]))
        ids = rng.integers(0, row["vocab_size"], (batch, seq))
        feeds = {"input_features": frames.astype(np.float32), "decoder_input_ids": ids.astype(np.int64)}
        checks.append((feeds, ort_run(model.onnx, feeds), hf_run(model, feeds)))
    for feeds, got, want in checks:
        assert [g.shape for g in got] == [
            (feeds["decoder_input_ids"].shape[0], feeds["decoder_input_ids"].shape[1], row["d_model"]),
            (feeds["decoder_input_ids"].shape[0], row["max_source_positions"], row["d_model"]),
        ]
        assert_close(got, want, hf_run(model, feeds, hooked=False))


@pytest.mark.slow
def test_cli_inserts_and_exports_a_raw_audio_model(tmp_path, cli):
    """`surgery insert` then `surgery export` as a user runs them on a wav2vec2 folder's config; the adapters get
    distinct random weights between the two (a trained model's stand-in), and ONNX Runtime's output on a length the
    check did not use matches the saved program's."""
    from surgery.bundle import save_program
    from surgery.pipeline import open_model

    config = write_config("wav2vec2", tmp_path / "w2v")
    run = cli("insert", "--r", "4", str(config), "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["sites"] == [p for p, _ in AUDIO_SITES]
    pt2 = tmp_path / run.json["output"]
    adapted = open_model(str(pt2))
    assert adapted.signature.inputs[0].name == "input_values" and adapted.signature.axes()["samples"].unproven
    stand_in_weights(adapted.gm, seed=3)
    save_program(pt2, adapted.gm, adapted.manifest)

    run = cli("export", str(pt2), "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    onnx = tmp_path / run.json["onnx"]
    x = np.random.default_rng(2).standard_normal((2, 2345)).astype(np.float32)
    with torch.no_grad():
        want = torch.export.load(pt2).module()(input_values=torch.from_numpy(x))
        base = open_model(str(config)).gm(input_values=torch.from_numpy(x))
    assert np.abs(want[0].numpy() - base[0].numpy()).max() > 1e-2
    got = ort_run(onnx, {"input_values": x})
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-4, rtol=1e-4)


def test_the_samples_axis_keeps_its_form_through_the_manifest():
    """An `unproven` axis (Dim.DYNAMIC at capture) reads back as one; the form earlier versions wrote still reads."""
    from surgery.signature import Axis, InputSpec

    spec = InputSpec(
        "input_values", (2, 16000), "float32", {0: Axis("batch", 1, 64), 1: Axis("samples", 60, 900, (), True)}
    )
    assert InputSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec.to_json()["axes"] == {"0": ["batch", 1, 64], "1": ["samples", 60, 900, [], True]}
    old = {"name": "x", "shape": [2, 5], "dtype": "float32", "axes": {"1": ["seq", 2, 9]}, "high": None}
    assert InputSpec.from_json(old).axes == {1: Axis("seq", 2, 9)}
    dims = Signature((spec,)).dynamic_shapes()["input_values"]
    assert isinstance(dims[0], torch.export.Dim) and not isinstance(dims[1], torch.export.Dim)
