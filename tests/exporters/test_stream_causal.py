"""Streamed export of a causal LM with its KV cache (surgery/meta.py `capture_meta` with task causal-lm, then
exporters/stream.py): the layout of optimum and onnxruntime-genai (past_key_values.N.key/value in, logits and
present.N.* out, opset OPSET_CACHE), equal to the in-memory causal-LM export tensor by tensor, checked block by block
with each block's present key and value compared by name, and greedy tokens through `exporters.runtime.Generator` the
same as on the in-memory export. Slow tier: each export runs torch.onnx (about 10 s here)."""

from __future__ import annotations

import onnx
import pytest

from exporters.onnx import OPSET_CACHE, export_onnx
from exporters.runtime import Generator
from exporters.stream import export_streamed
from surgery.adapters import parse_spec, stand_in_weights
from surgery.meta import capture_meta
from surgery.parity import compare
from surgery.pipeline import adapt, open_model
from tests.checkpoints import write_checkpoint
from tests.exporters.streamed import arrays, assert_in_streamed

pytestmark = pytest.mark.slow
SPEC = parse_spec("lora", "4", targets="q,v,ffn_out")
PROMPT = [5, 17, 30, 42, 9, 77]
NEW = 24


def adapted(captured):
    adapt(captured, SPEC, seed=0)
    stand_in_weights(captured.gm, seed=3)  # distinct non-zero adapters: a zero LoRA is the base model
    return captured


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llama"), "llama")  # LlamaForCausalLM: causal-lm by default


@pytest.fixture(scope="module")
def exports(folder, tmp_path_factory):
    """(weightless capture, streamed export, in-memory export path) of the tiny Llama with its cache, LoRA r=4."""
    out = tmp_path_factory.mktemp("causal")
    fake = adapted(capture_meta(str(folder)))
    streamed = export_streamed(fake, out / "s.onnx")
    eager = adapted(open_model(str(folder)))
    export_onnx(eager.gm, eager.signature, out / "m.onnx")
    return fake, streamed, out / "m.onnx"


def test_streamed_causal_lm_has_the_cache_layout_and_is_the_in_memory_export(exports):
    fake, streamed, memory = exports
    assert fake.task == "causal-lm"
    s_model, s = arrays(streamed.path)
    m_model, m = arrays(memory)
    inputs = [i.name for i in s_model.graph.input]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert [o.name for o in s_model.graph.output] == ["logits"] + [
        f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert [o.version for o in s_model.opset_import if o.domain == ""] == [OPSET_CACHE]
    assert [str(i) for i in s_model.graph.input] == [str(i) for i in m_model.graph.input]  # axes: past, total ...
    assert [str(o) for o in s_model.graph.output] == [str(o) for o in m_model.graph.output]
    assert {p.key: p.value for p in s_model.metadata_props} == {p.key: p.value for p in m_model.metadata_props}
    external = {t.name for t in s_model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    base = {n for n in external if not n.startswith("adapters.")}  # LoRA tensors past 1 KB are in the data file too
    assert len(base) == streamed.from_checkpoint == len(fake.keys) == 21  # lm_head tied: one tensor, embed_tokens
    # every tensor of the in-memory export is one of the streamed file's (by name, or transposed)
    assert_in_streamed(s, m)


def test_blocks_compare_their_present_key_and_value_by_name(exports):
    _, streamed, _ = exports
    assert streamed.blocks is not None and streamed.blocks.ok, streamed.blocks.summary()
    parts = {p.name: set(p.parity.to_json()["per_output"]) for p in streamed.blocks.parts}
    assert list(parts) == ["block 0", "block 1", "output"]
    for i in range(2):
        assert {f"present.{i}.key", f"present.{i}.value"} <= parts[f"block {i}"]
    assert "logits" in parts["output"]


def test_greedy_tokens_through_the_generator_equal_the_in_memory_exports(exports):
    _, streamed, memory = exports
    want = Generator(memory).generate(PROMPT, NEW, keep_logits=True)
    got = Generator(streamed.path).generate(PROMPT, NEW, keep_logits=True)
    assert len(set(want.tokens[0])) > 4, f"a degenerate sequence proves little: {want.tokens[0]}"
    assert got.tokens == want.tokens and got.steps == NEW
    for step, (a, b) in enumerate(zip(want.logits, got.logits)):
        parity = compare([a], [b], names=["logits"], where=f"step {step}")
        assert parity.ok, parity.summary()


def test_cli_streams_a_causal_lm_with_its_cache(cli, folder, tmp_path):
    run = cli("export", folder, "--stream", "--method", "lora", "--r", "4", "-o", "lm.onnx", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["blockwise"]["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.onnx", "lm.onnx.data"]
    gen = Generator(tmp_path / "lm.onnx")
    assert (gen.layers, gen.kv_heads, gen.max_positions) == (2, 2, 128)


def test_streamed_swappable_causal_lm_generates_as_the_in_memory_one(folder, tmp_path):
    """--stream --swappable on the cache graph: the same tokens as the in-memory swappable export, with no pack and
    with the model's own pack (written beside the pair), and the pack changes them."""
    from exporters.swappable import export_swappable
    from surgery.bundle import adapted_manifest

    spec = parse_spec("houlsby", "4")

    def bottlenecks(captured):
        report = adapt(captured, spec, seed=0)
        stand_in_weights(captured.gm, seed=3)
        captured.manifest = adapted_manifest(captured, spec, report)
        return captured

    streamed = export_streamed(
        bottlenecks(capture_meta(str(folder))), tmp_path / "s.onnx", swappable=True, pack=tmp_path / "s.onnx_adapter"
    )
    assert streamed.no_pack is not None and streamed.no_pack.ok and streamed.blocks is not None and streamed.blocks.ok
    export_swappable(bottlenecks(open_model(str(folder))), tmp_path / "m.onnx")
    tokens = {}
    for name in ("s", "m"):
        gen = Generator(tmp_path / f"{name}.onnx")
        gen.load("own", streamed.pack)
        tokens[name] = (gen.generate(PROMPT, NEW).tokens, gen.generate(PROMPT, NEW, adapter="own").tokens)
    assert tokens["s"] == tokens["m"]
    assert tokens["s"][0] != tokens["s"][1]  # the pack changes the tokens: the comparison above sees adapters


def test_gpt2_streams_with_its_tied_head_and_fused_qkv(tmp_path):
    """GPT-2: lm_head is tied to wte (the checkpoint holds wte alone; the exporter may name either), and the optimizer
    writes c_attn's q/k/v Split without a module path (block-wise verification puts it with its inputs' block)."""
    folder = write_checkpoint(tmp_path / "gpt2", "gpt2")
    fake = adapted(capture_meta(str(folder)))
    streamed = export_streamed(fake, tmp_path / "s.onnx")
    assert streamed.blocks is not None and streamed.blocks.ok, streamed.blocks.summary()
    assert [p.name for p in streamed.blocks.parts] == ["block 0", "block 1", "output"]
    eager = adapted(open_model(str(folder)))
    export_onnx(eager.gm, eager.signature, tmp_path / "m.onnx")
    want = Generator(tmp_path / "m.onnx").generate(PROMPT, NEW, keep_logits=True)
    got = Generator(streamed.path).generate(PROMPT, NEW, keep_logits=True)
    assert got.tokens == want.tokens  # the tiny random GPT-2 repeats itself: the logits say more
    for step, (a, b) in enumerate(zip(want.logits, got.logits)):
        parity = compare([a], [b], names=["logits"], where=f"step {step}")
        assert parity.ok, parity.summary()


def test_bf16_archive_streams_and_generates_as_its_in_memory_export(cli, folder, tmp_path):
    """A bf16 causal LM's `.adapted.pt2` (bf16 past key/values in its signature) through the streamed path: the
    block-wise check feeds those inputs, and the streamed file decodes the same tokens as the in-memory export."""
    made = cli("insert", folder, "--method", "lora", "--r", "4", "--dtype", "bf16", "-o", "m.adapted.pt2", cwd=tmp_path)
    assert made.code == 0, made.stderr
    streamed = cli("export", "m.adapted.pt2", "--stream", "-o", "s.onnx", "--json", cwd=tmp_path)
    assert streamed.code == 0, streamed.stderr
    assert streamed.json["blockwise"]["ok"]
    eager = cli("export", "m.adapted.pt2", "-o", "m.onnx", cwd=tmp_path)
    assert eager.code == 0, eager.stderr
    tokens = [Generator(tmp_path / f).generate(PROMPT, 8).tokens for f in ("s.onnx", "m.onnx")]
    assert tokens[0] == tokens[1]
