"""Causal LMs with their KV cache: export, `exporters.runtime.Generator`, and `surgery generate`.

Everything is held to transformers itself: the HF model with the same weights and the adapters as forward hooks
(tests/lm_reference.py), its greedy `generate` for the tokens and its per-step logits for `surgery.parity.compare`.
Adapters carry distinct random non-zero weights. The fast tier runs one family (Llama-shaped, grouped-query attention)
baked, and the checks `surgery run` makes of a cache graph's inputs; the four families, swappable packs, routed rows
and the CLI are `slow`.
"""

from __future__ import annotations

import copy
import dataclasses

import re

import numpy as np
import pytest

from exporters.onnx import export_onnx
from exporters.runtime import Generator
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.errors import SurgeryError
from surgery.parity import compare
from surgery.pipeline import adapt, stand_in_adapted
from tests.lm_reference import hf_generate, hf_model

PROMPTS = [[5, 17, 300, 42, 9, 77, 123], [8, 250, 31], [600, 2, 19, 44, 71], [99, 98, 97, 96, 95, 94, 93, 92, 91]]
NEW = 32


def _logits_match(reference: list[np.ndarray], got: list[np.ndarray], where: str) -> None:
    assert len(reference) == len(got), (len(reference), len(got))
    for step, (want, have) in enumerate(zip(reference, got)):
        parity = compare([want], [have], names=["logits"], where=f"{where}, step {step}")
        assert parity.ok, parity.summary()


@pytest.fixture(scope="module")
def llama_baked(lm_base, lm_config, tmp_path_factory):
    """The Llama-shaped LM adapted in memory (Houlsby r=4, random weights), exported baked; and its HF reference."""
    base = lm_base("llama")
    adapted = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    spec = AdapterSpec("houlsby", r=4)
    report = adapt(adapted, spec)
    stand_in_weights(adapted.gm, seed=3)
    path = tmp_path_factory.mktemp("llama-baked") / "llama.onnx"
    export_onnx(adapted.gm, adapted.signature, path)
    return path, hf_model(lm_config("llama"), adapted, spec, report.sites), hf_model(lm_config("llama"), base)


def test_greedy_tokens_and_logits_equal_transformers_with_and_without_cache(llama_baked):
    path, reference, base = llama_baked
    gen = Generator(path)
    assert (gen.layers, gen.kv_heads, gen.head_dim, gen.max_positions) == (2, 2, 16, 256)  # GQA: 2 KV heads of 4
    want, want_logits = hf_generate(reference, PROMPTS[0], NEW)
    assert len(set(want)) > 4, f"a degenerate reference proves little: {want}"
    assert want != hf_generate(base, PROMPTS[0], NEW)[0], "the adapters must change the tokens"
    for use_cache in (True, False):
        out = gen.generate(PROMPTS[0], NEW, keep_logits=True, use_cache=use_cache)
        assert out.tokens[0] == want, f"use_cache={use_cache}"
        _logits_match(want_logits, [x[0:1] for x in out.logits], f"use_cache={use_cache}")
    assert out.ttft_s > 0 and out.steps == NEW


def test_cache_shapes_across_prefill_and_decode(llama_baked):
    gen = Generator(llama_baked[0])
    seen = []
    original = gen._run

    def spy(feeds, options):
        result = original(feeds, options)
        seen.append((feeds["past_key_values.1.value"].shape, result["present.1.value"].shape, result["logits"].shape))
        return result

    gen._run = spy
    gen.generate([PROMPTS[0], PROMPTS[1]], 3)
    assert seen == [
        ((2, 2, 0, 16), (2, 2, 7, 16), (2, 7, 1000)),  # prefill: past 0, both prompts left-padded to 7
        ((2, 2, 7, 16), (2, 2, 8, 16), (2, 1, 1000)),
        ((2, 2, 8, 16), (2, 2, 9, 16), (2, 1, 1000)),
    ]


def test_stop_token_ends_the_row_where_transformers_stops(llama_baked):
    path, reference, _ = llama_baked
    full, _ = hf_generate(reference, PROMPTS[0], NEW)
    stop = full[6]
    want, _ = hf_generate(reference, PROMPTS[0], NEW, stop=stop)
    assert want == full[: full.index(stop) + 1]
    out = Generator(path).generate([PROMPTS[0]], NEW, stop_tokens=[stop])
    assert out.tokens[0] == want and out.steps == len(want)


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama_baked):
    gen = Generator(llama_baked[0])
    greedy = gen.generate(PROMPTS[2], 12).tokens
    a = gen.generate(PROMPTS[2], 12, temperature=1.5, top_p=0.9, seed=7).tokens
    assert a == gen.generate(PROMPTS[2], 12, temperature=1.5, top_p=0.9, seed=7).tokens
    assert a != gen.generate(PROMPTS[2], 12, temperature=1.5, top_p=0.9, seed=8).tokens
    assert gen.generate(PROMPTS[2], 12, temperature=1.5, top_k=1, seed=1).tokens == greedy
    streamed = []
    gen.generate(PROMPTS[2], 12, on_token=lambda step, tokens: streamed.append((step, int(tokens[0]))))
    assert streamed == list(enumerate(greedy[0]))


def test_steps_in_lockstep_give_generates_tokens_and_leave_the_callers_time_out(llama_baked):
    """Two generations stepped in turn (as benchmarks/generate.py times a pair) decode what `generate` decodes, row
    by row, and their times count their own steps only: the caller's 20 ms between steps is not in them."""
    import time

    gen = Generator(llama_baked[0])
    want = [gen.generate(PROMPTS[k], 6).tokens for k in (0, 1)]
    streams = [gen.steps(PROMPTS[k], 6) for k in (0, 1)]
    outs, wall = [None, None], time.perf_counter()
    for _ in range(6):
        for k, stream in enumerate(streams):
            outs[k] = next(stream)
            time.sleep(0.01)
    wall = time.perf_counter() - wall
    assert [o.tokens for o in outs] == want and all(next(s, None) is None for s in streams)
    for out in outs:
        assert out.steps == 6 and out.ttft_s > 0 and out.decode_s > 0
        assert out.ttft_s + out.decode_s < wall - 0.1  # 12 sleeps of 10 ms between the two streams' steps


# IO binding (the ORT CUDA path, `Generator(..., io_binding=True)`), run here on the CPU provider, where ORT binds the
# same way: the cache of each step is the OrtValue the step before returned, never a numpy array.


def _bound_equals_numpy(path_or_session, prompts, where: str, **kwargs) -> None:
    """Greedy tokens and every step's logits through IO binding equal the numpy path's, and past the prefill the
    cache reaches each step as OrtValues (it never went through numpy)."""
    plain, bound = (Generator(path_or_session, io_binding=flag) for flag in (False, True))
    assert (plain.io_binding, bound.io_binding, bound.device) == (False, True, ("cpu", 0))
    for pack in kwargs.pop("packs", []):
        for gen in (plain, bound):
            gen.load(*pack)
    past_types = []
    original = bound._run_bound

    def spy(feeds, options):
        past_types.append({type(v).__name__ for n, v in feeds.items() if n.startswith("past_key_values.")})
        return original(feeds, options)

    bound._run_bound = spy
    for request in kwargs.pop("requests", [{}]):  # several requests in turn: packs switched between them
        want = plain.generate(prompts, NEW, keep_logits=True, **kwargs, **request)
        got = bound.generate(prompts, NEW, keep_logits=True, **kwargs, **request)
        assert got.tokens == want.tokens, f"{where} {request}"
        _logits_match(want.logits, got.logits, f"{where} {request}, IO binding")
        assert past_types[0] == {"ndarray"} and all(t == {"OrtValue"} for t in past_types[1:]), past_types
        past_types.clear()


def test_io_binding_equals_the_numpy_path_baked_gqa_and_stops(llama_baked):
    path = llama_baked[0]  # baked Houlsby on the Llama shape: 2 KV heads for 4 query heads
    _bound_equals_numpy(path, [PROMPTS[0], PROMPTS[1]], "baked")  # two rows, left-padded
    assert Generator(path).io_binding is False, "on the CPU provider the default stays the numpy path"
    full = Generator(path).generate(PROMPTS[0], NEW).tokens[0]
    stop = full[6]
    out = Generator(path, io_binding=True).generate(PROMPTS[0], NEW, stop_tokens=[stop])
    assert out.tokens[0] == full[: full.index(stop) + 1] and out.steps == full.index(stop) + 1


@pytest.mark.slow
def test_io_binding_equals_the_numpy_path_swappable_with_pack_switches(llama_swappable):
    path, packs = llama_swappable
    requests = [dict(adapter="p0"), dict(adapter="p1"), dict(adapter=None), dict(adapter="p0")]
    _bound_equals_numpy(path, PROMPTS[1], "swappable", packs=[("p0", packs[0]), ("p1", packs[1])], requests=requests)


@pytest.mark.slow
def test_run_with_iobinding_ignores_the_adapter_run_options_activate(llama_swappable):
    """Why `AdaptedSession.adapter_values` exists: ONNX Runtime (1.32) applies a RunOptions' active adapter in
    `session.run` but not in `run_with_iobinding`, which runs the base model. If this fails, ORT applies it there
    too, and the pack need no longer be bound by hand."""
    from exporters.runtime import AdaptedSession

    path, packs = llama_swappable
    adapted = AdaptedSession(path)
    adapted.load("p0", packs[0])
    feeds = _cache_feeds(batch=1, seq=3, past=0)
    with_pack, base = (adapted.session.run(["logits"], feeds, o)[0] for o in (adapted.run_options("p0"), None))
    assert not np.allclose(with_pack, base), "the pack must change the logits"
    bound = {}
    for values in ({}, adapted.adapter_values("p0")):
        binding = adapted.session.io_binding()
        for name, value in {**feeds, **values}.items():
            (binding.bind_cpu_input if isinstance(value, np.ndarray) else binding.bind_ortvalue_input)(name, value)
        binding.bind_output("logits", "cpu", 0)
        adapted.session.run_with_iobinding(binding, adapted.run_options("p0"))
        bound[len(values) > 0] = binding.get_outputs()[0].numpy().copy()
    np.testing.assert_array_equal(bound[False], base)  # the RunOptions' pack ignored
    np.testing.assert_allclose(bound[True], with_pack, rtol=1e-5, atol=1e-5)  # the pack bound as inputs


@pytest.mark.slow
def test_io_binding_equals_the_numpy_path_routed(llama_models, tmp_path):
    from exporters.swappable import export_routed

    export_routed(llama_models, tmp_path / "r.onnx")
    _bound_equals_numpy(tmp_path / "r.onnx", PROMPTS, "routed", adapter_ids=[2, -1, 0, 1])


# `surgery run` on a cache graph: its inputs checked as a KV cache before ONNX Runtime sees them.


def _cache_feeds(batch=2, seq=5, past=3, layers=2, **changes) -> dict[str, np.ndarray]:
    """Feeds of the Llama-shaped cache graph (2 KV heads of 16): `seq` new tokens after `past` cached positions."""
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 1000, (batch, seq)),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64),
        **{
            f"past_key_values.{n}.{kind}": rng.standard_normal((batch, 2, past, 16)).astype(np.float32)
            for n in range(layers)
            for kind in ("key", "value")
        },
    }
    feeds.update(changes)
    return {k: v for k, v in feeds.items() if v is not None}


CACHE = "past_key_values.N.key/.value for N in 0..1, each float32 (batch, 2 KV heads, past, 16 per head)"
BAD_CACHE_FEEDS = {
    "no cache": (dict(layers=1), f"no past_key_values.1.key; this model takes its KV cache as {CACHE}; for a prompt"),
    "kv heads": (dict(**{"past_key_values.1.key": np.zeros((2, 4, 3, 16), np.float32)}), "is shaped [2, 4, 3, 16]"),
    "dtype": (dict(**{"past_key_values.0.value": np.zeros((2, 2, 3, 16))}), "past_key_values.0.value is float64"),
    "layers disagree": (
        dict(**{"past_key_values.1.value": np.zeros((2, 2, 4, 16), np.float32)}),
        "past_key_values.1.value holds 2 rows of 4 past positions, past_key_values.0.key 2 of 3",
    ),
    "mask without the past": (
        dict(attention_mask=np.ones((2, 5), np.int64)),
        "attention_mask covers 5 positions; with 3 past and 5 new tokens it covers 8",
    ),
    "position_ids shape": (dict(position_ids=np.zeros((2, 4), np.int64)), "position_ids is shaped [2, 4]"),
    "position past the end": (
        dict(position_ids=np.full((2, 5), 300)),
        "position_ids holds 300; this model's positions",
    ),
    "too long": (dict(past=254), "254 past + 5 new tokens = 259 positions; the model has 256"),
}


@pytest.mark.parametrize("case", list(BAD_CACHE_FEEDS))
def test_cache_graph_inputs_are_refused_in_one_line_before_onnx_runtime(llama_baked, case):
    from exporters.inputs import CacheLayout, check_cache_feeds, check_feeds, graph_inputs
    from exporters.verify import ort_session

    session = ort_session(llama_baked[0])
    inputs = graph_inputs(session)
    cache = CacheLayout.of(inputs, session.get_modelmeta().custom_metadata_map)
    assert (cache.layers, cache.kv_heads, cache.head_dim, cache.max_positions) == (2, 2, 16, 256)
    changes, message = BAD_CACHE_FEEDS[case]
    with pytest.raises(SurgeryError, match=re.escape(message)):
        check_cache_feeds(_cache_feeds(**changes), cache, "--input x.npz")
    good = _cache_feeds()
    check_cache_feeds(good, cache, "--input x.npz")
    check_feeds(good, inputs, 1000, "--input x.npz")
    logits, present = session.run(["logits", "present.1.value"], good)
    assert logits.shape == (2, 5, 1000) and present.shape == (2, 2, 8, 16)


# The slow tier: four families, packs per request, adapters per row, the CLI.


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma"])
def test_families_greedy_parity_with_and_without_cache(family, lm_base, lm_config, tmp_path):
    base = lm_base(family)
    adapted = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    spec = AdapterSpec("houlsby", r=4)
    report = adapt(adapted, spec)
    stand_in_weights(adapted.gm, seed=5)
    export_onnx(adapted.gm, adapted.signature, tmp_path / "m.onnx")
    reference = hf_model(lm_config(family), adapted, spec, report.sites)
    want, want_logits = hf_generate(reference, PROMPTS[0], NEW)
    assert len(set(want)) > 4, f"a degenerate reference proves little: {want}"
    gen = Generator(tmp_path / "m.onnx")
    for use_cache in (True, False):
        out = gen.generate(PROMPTS[0], NEW, keep_logits=True, use_cache=use_cache)
        assert out.tokens[0] == want, f"{family}, use_cache={use_cache}"
        _logits_match(want_logits, out.logits, f"{family}, use_cache={use_cache}")


@pytest.fixture(scope="module")
def llama_models(lm_base, tmp_path_factory):
    """Three adapted copies of the Llama-shaped LM (Houlsby r=4, then r=2 and r=6: other random weights, other
    ranks), saved as .adapted.pt2 and reopened, as trained models arrive."""
    base = lm_base("llama")
    folder = tmp_path_factory.mktemp("llama-models")
    return [
        stand_in_adapted(base, AdapterSpec("houlsby", r=r), folder / f"m{k}.adapted.pt2", seed=k, weights_seed=50 + k)
        for k, r in enumerate((4, 2, 6))
    ]


@pytest.fixture(scope="module")
def llama_swappable(llama_models, tmp_path_factory):
    """The first model exported --swappable, and the packs of the first two."""
    from exporters.swappable import export_swappable
    from surgery.packs import pack_from_model, save_pack

    folder = tmp_path_factory.mktemp("llama-swappable")
    export_swappable(llama_models[0], folder / "s.onnx")
    packs = [
        save_pack(pack_from_model(m.gm.state_dict(), m.manifest), folder / f"p{k}.onnx_adapter")
        for k, m in enumerate(llama_models[:2])
    ]
    return folder / "s.onnx", packs


@pytest.mark.slow
def test_swappable_pack_switch_between_requests_in_one_session(llama_swappable, llama_models, lm_base, lm_config):
    path, packs = llama_swappable
    gen = Generator(path)
    for k, pack in enumerate(packs):
        gen.load(f"p{k}", pack)
    config = lm_config("llama")
    expected = {
        "p0": hf_generate(hf_model(config, llama_models[0]), PROMPTS[1], NEW),
        "p1": hf_generate(hf_model(config, llama_models[1]), PROMPTS[1], NEW),
        None: hf_generate(hf_model(config, lm_base("llama")), PROMPTS[1], NEW),
    }
    assert len({tuple(t) for t, _ in expected.values()}) == 3, "each adapter must change the tokens"
    for adapter in ("p0", "p1", None, "p0"):  # switches between requests, and back
        out = gen.generate(PROMPTS[1], NEW, adapter=adapter, keep_logits=True)
        assert out.tokens[0] == expected[adapter][0], adapter
        _logits_match(expected[adapter][1], out.logits, f"pack {adapter}")


@pytest.mark.slow
def test_routed_batch_of_four_streams_equals_four_separate_runs(llama_models, lm_base, lm_config, tmp_path):
    from exporters.swappable import export_routed

    export_routed(llama_models, tmp_path / "r.onnx")
    gen = Generator(tmp_path / "r.onnx")
    ids = [2, -1, 0, 1]  # each row another adapter, one none; prompts of 4 lengths (left padding)
    batch = gen.generate(PROMPTS, NEW, adapter_ids=ids, keep_logits=True)
    config = lm_config("llama")
    for row, (prompt, i) in enumerate(zip(PROMPTS, ids)):
        alone = gen.generate(prompt, NEW, adapter_ids=[i], keep_logits=True)
        assert batch.tokens[row] == alone.tokens[0], f"row {row}, adapter {i}"
        _logits_match([x[0:1] for x in alone.logits], [x[row : row + 1] for x in batch.logits], f"row {row}")
        want, _ = hf_generate(hf_model(config, llama_models[i] if i >= 0 else lm_base("llama")), prompt, NEW)
        assert alone.tokens[0] == want, f"row {row}, adapter {i}: against transformers"
    assert len({tuple(t) for t in batch.tokens}) == 4


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """A folder with a tokenizer.json over the tiny vocabulary (1000 words: w0 ... w999, w0 unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.slow
def test_cli_generate_streams_text_and_refuses_bad_input_in_one_line(
    cli, llama_swappable, llama_models, lm_config, word_tokenizer, tmp_path
):
    from surgery.packs import pack_from_model, save_pack

    path, packs = llama_swappable
    prompt = " ".join(f"w{i}" for i in PROMPTS[1])
    done = cli("generate", path, "--tokenizer", word_tokenizer, "--prompt", prompt, "--adapter", packs[1], "--json")
    assert done.code == 0, done.stderr
    want, _ = hf_generate(hf_model(lm_config("llama"), llama_models[1]), PROMPTS[1], 16)
    data = done.json
    assert data["prompt_tokens"] == 3 and data["tokens"][0][:16] == want and data["steps"] == NEW
    assert data["text"].split()[:16] == [f"w{t}" for t in want] and data["ttft_ms"] > 0
    assert data["decode_tokens_per_s"] > 0

    streamed = cli("generate", path, "--tokenizer", word_tokenizer, "--prompt", prompt, "--max-new-tokens", "4")
    assert (
        streamed.code == 0
        and streamed.stdout.split()[:4] == [f"w{t}" for t in data["tokens"][0][:4]]
        or (streamed.code == 0 and len(streamed.stdout.split()) == 4)
    ), streamed.stderr
    assert "time to first token" in streamed.stderr and "tokens/s" in streamed.stderr

    other = llama_models[1].manifest
    foreign = dataclasses.replace(other, source=dataclasses.replace(other.source, sha256="0" * 64))
    save_pack(pack_from_model(llama_models[1].gm.state_dict(), foreign), tmp_path / "foreign.onnx_adapter")
    (tmp_path / "empty").mkdir()
    cases = {
        "longer than the model's 256 positions": ["--prompt", " ".join(["w5"] * 300)],
        "holds no tokenizer.json": ["--prompt", prompt, "--tokenizer", tmp_path / "empty"],
        "was made for another model": ["--prompt", prompt, "--adapter", tmp_path / "foreign.onnx_adapter"],
    }
    for message, args in cases.items():
        if "--tokenizer" not in args:
            args = [*args, "--tokenizer", word_tokenizer]
        bad = cli("generate", path, *args)
        assert bad.code == 2, (message, bad.stderr)
        assert message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) <= 2, bad.stderr


def _kernels(path, folder) -> list[str]:
    """The op types ONNX Runtime runs for `path` once its graph optimizations are done."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(folder / f"{path.stem}.optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_rms_norm_and_attention_reach_onnx_runtime_as_one_kernel_each(llama_baked, lm_config, tmp_path):
    """The tiny Llama has 5 RMSNorms (2 per layer, 1 final) and 2 attentions.
    - With its cache (opset 23), each is one ONNX op, RMSNormalization, RotaryEmbedding, Attention, and the cache
      reaches Attention with its 2 KV heads (no repeat_kv copy of it per step).
    - Without it (opset 20), torch's rsqrt is exported as Sqrt, Reciprocal, Mul, which ONNX Runtime does not fuse;
      `lean_proto` rewrites it as Sqrt, Div, which ONNX Runtime fuses into SimplifiedLayerNormalization."""
    from surgery.pipeline import open_model

    cached = _kernels(llama_baked[0], tmp_path)
    assert (cached.count("RMSNormalization"), cached.count("Attention")) == (5, 2), sorted(set(cached))
    assert cached.count("RotaryEmbedding") == 4, sorted(set(cached))  # queries and keys of each layer
    import onnx

    graph = onnx.load(str(llama_baked[0])).graph  # 2 KV heads for 4 query heads, grouped inside Attention
    readers = [n.op_type for n in graph.node if any(i.startswith("past_key_values.") for i in n.input)]
    readers = [r for r in readers if r != "Shape"]  # the past length, for the positions
    writers = [n.op_type for n in graph.node if any(o.startswith("present.") for o in n.output)]
    assert readers == writers == ["Attention", "Attention"], (readers, writers)
    # Attention-23's 3-D form (exporters/onnx.py attention_in_3d): heads split, cache appended and heads merged
    # inside the op, so no Reshape, Transpose or Concat around it
    for node in (n for n in graph.node if n.op_type == "Attention"):
        heads = {a.name: a.i for a in node.attribute if a.name.endswith("num_heads")}
        assert heads == {"q_num_heads": 4, "kv_num_heads": 2} and len(node.input) == 6, (heads, node.input)
    assert "Transpose" not in cached, sorted(set(cached))

    plain = open_model(str(lm_config("llama")), task="feature-extraction")
    path = tmp_path / "features.onnx"
    export_onnx(plain.gm, plain.signature, path)
    kernels = _kernels(path, tmp_path)
    assert "Reciprocal" not in kernels
    assert kernels.count("SimplifiedLayerNormalization") == 5, sorted(set(kernels))


@pytest.mark.slow
def test_cli_run_on_a_cache_graph_takes_past_and_refuses_bad_input_in_one_line(llama_baked, cli, tmp_path):
    path = llama_baked[0]
    run = cli("run", path, "--shape", "batch=2,seq=3,past=4", "--json")
    assert run.code == 0, run.stderr
    outputs = run.json["outputs"]
    assert outputs["logits"]["shape"] == [2, 3, 1000] and outputs["present.0.key"]["shape"] == [2, 2, 7, 16]
    prompt = cli("run", path, "--json")  # the default: a prompt of 128 tokens, past 0
    assert prompt.code == 0 and prompt.json["outputs"]["present.1.value"]["shape"] == [1, 2, 128, 16], prompt.stderr
    np.savez(tmp_path / "no_cache.npz", **_cache_feeds(layers=1))
    cases = {
        "no past_key_values.1.key; this model takes its KV cache as": ["--input", tmp_path / "no_cache.npz"],
        "250 past + 10 new tokens = 260 positions; the model has 256": ["--shape", "seq=10,past=250"],
    }
    for message, args in cases.items():
        bad = cli("run", path, *args, "-o", tmp_path / "out.npz")
        assert bad.code == 2, (message, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "out.npz").exists()
