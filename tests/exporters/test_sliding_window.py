"""Causal LMs with sliding-window attention (Mistral: one window; Gemma 2 and 3: local and global layers) captured
with their full KV cache and a windowed mask on the local layers (surgery/tasks.py).

Tiny configs with windows of 6 and 8 positions (tests/families.py CAUSAL_LMS), so that prompts and generations of a
few dozen tokens run far past the window. Everything is held to transformers' own model with the same weights and the
adapters as forward hooks (tests/lm_reference.py): greedy tokens up to the reference's first near tie of its top two
logits, and every step's logits within the parity tolerance. The fast tier runs Gemma 3's form baked; Mistral, Gemma 2,
swappable packs, routed rows and the streamed export are `slow`.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest

from exporters.onnx import export_onnx
from exporters.runtime import Generator
from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.errors import SurgeryError
from surgery.parity import compare
from surgery.pipeline import adapt, stand_in_adapted
from surgery.tasks import sliding_windows
from tests.families import CAUSAL_LMS
from tests.lm_reference import hf_generate, hf_model, until_near_tie

PROMPTS = [[5, 17, 300, 42, 9, 77, 123, 4, 8, 250, 31, 600, 2], [19, 44, 71, 99]]  # 13 and 4 tokens
NEW = 30


def window_of(family: str) -> int:
    return CAUSAL_LMS[family][2]["sliding_window"]


def assert_greedy_parity(want: list[int], want_logits: list, tokens: list[int], logits: list, where: str) -> int:
    """`tokens` are the reference's up to its first near tie (all of them if none); every step's logits agree within
    the parity tolerance while the tokens do. Returns the number of steps compared."""
    parities = [
        compare([a], [b], names=["logits"], where=f"{where}, step {k}")
        for k, (a, b) in enumerate(zip(want_logits, logits))
    ]
    margin = 2 * max(p.atol + p.rtol * p.outputs["logits"].ref_max for p in parities)
    sure = until_near_tie(want_logits, margin) if tokens != want else len(want)
    assert tokens[:sure] == want[:sure], where
    for parity in parities[:sure]:
        assert parity.ok, parity.summary()
    return sure


def adapted_copy(base, seed: int):
    adapted = dataclasses.replace(base, gm=copy.deepcopy(base.gm))
    spec = AdapterSpec("houlsby", r=4)
    report = adapt(adapted, spec)
    stand_in_weights(adapted.gm, seed=seed)
    return adapted, spec, report.sites


def check_family(family: str, lm_base, lm_config, path) -> None:
    """Baked export; a batch of two prompts (one longer than the window, one shorter: left padding) generating past
    the window, with and without the cache, against transformers row by row; and the window matters: the same
    weights with every window lifted give other tokens."""
    adapted, spec, sites = adapted_copy(lm_base(family), seed=5)
    export_onnx(adapted.gm, adapted.signature, path)
    reference = hf_model(lm_config(family), adapted, spec, sites)
    wants = [hf_generate(reference, p, NEW) for p in PROMPTS]
    for want, _ in wants:
        assert len(set(want)) > 4, f"a degenerate reference proves little: {want}"
    gen = Generator(path)
    for use_cache in (True, False):
        out = gen.generate(PROMPTS, NEW, keep_logits=True, use_cache=use_cache)
        for row, (want, want_logits) in enumerate(wants):
            where = f"{family}, row {row}, use_cache={use_cache}"
            sure = assert_greedy_parity(
                want, want_logits, out.tokens[row], [x[row : row + 1] for x in out.logits], where
            )
            assert len(PROMPTS[row]) + sure > 2 * window_of(family), f"{where}: the comparison must run past the window"
    config = copy.deepcopy(reference.config)
    config.sliding_window = 10_000  # past every position: no key is hidden
    full = hf_model(config, adapted, spec, sites)
    assert hf_generate(full, PROMPTS[0], NEW)[0] != wants[0][0], "the window must change the tokens"


def test_gemma3_local_and_global_layers_generate_transformers_tokens_past_the_window(lm_base, lm_config, tmp_path):
    check_family("gemma3", lm_base, lm_config, tmp_path / "m.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_families_generate_transformers_tokens_past_the_window(family, lm_base, lm_config, tmp_path):
    check_family(family, lm_base, lm_config, tmp_path / "m.onnx")


WINDOWS = {
    "one window (Mistral)": (dict(sliding_window=8, max_position_embeddings=256), {"full_attention": 8}),
    "local and global": (
        dict(sliding_window=8, max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"]),
        {"sliding_attention": 8},
    ),
    "every layer local, by type": (
        dict(sliding_window=8, max_position_embeddings=256, layer_types=["sliding_attention"] * 2),
        {"sliding_attention": 8},
    ),
    "no window": (dict(sliding_window=None, max_position_embeddings=256), {}),
    "window of every position": (dict(sliding_window=256, max_position_embeddings=256), {}),
    "windowless layer types": (
        dict(sliding_window=8, max_position_embeddings=256, layer_types=["full_attention"] * 2),
        {},
    ),
}


@pytest.mark.parametrize("case", list(WINDOWS))
def test_windows_by_layer_type(case):
    config, want = WINDOWS[case]
    assert sliding_windows(SimpleNamespace(**config), 256) == want


def test_chunked_attention_is_refused_in_one_line():
    config = SimpleNamespace(sliding_window=8, layer_types=["chunked_attention", "full_attention"])
    with pytest.raises(SurgeryError, match=r"layer types \['chunked_attention', 'full_attention'\] in the config"):
        sliding_windows(config, 256)


# Slow: swappable packs and routed rows on Gemma 3's form, and the streamed export.


@pytest.fixture(scope="module")
def gemma3_models(lm_base, tmp_path_factory):
    """Two adapted copies of the Gemma 3 form (Houlsby r=4 and r=2, other random weights), saved and reopened."""
    base = lm_base("gemma3")
    folder = tmp_path_factory.mktemp("gemma3-models")
    return [
        stand_in_adapted(base, AdapterSpec("houlsby", r=r), folder / f"m{k}.adapted.pt2", seed=k, weights_seed=60 + k)
        for k, r in enumerate((4, 2))
    ]


@pytest.mark.slow
def test_swappable_and_routed_generate_each_adapters_tokens_past_the_window(gemma3_models, lm_config, tmp_path):
    from exporters.swappable import export_routed, export_swappable
    from surgery.packs import pack_from_model, save_pack

    export_swappable(gemma3_models[0], tmp_path / "s.onnx")
    export_routed(gemma3_models, tmp_path / "r.onnx")
    references = [hf_model(lm_config("gemma3"), m) for m in gemma3_models]
    wants = [hf_generate(ref, PROMPTS[0], NEW) for ref in references]
    assert wants[0][0] != wants[1][0], "the two adapters must give other tokens"
    swappable = Generator(tmp_path / "s.onnx")
    for k, m in enumerate(gemma3_models):
        swappable.load(
            f"p{k}", save_pack(pack_from_model(m.gm.state_dict(), m.manifest), tmp_path / f"p{k}.onnx_adapter")
        )
    routed = Generator(tmp_path / "r.onnx")
    rows = routed.generate([PROMPTS[0]] * 2, NEW, keep_logits=True, adapter_ids=[1, 0])
    for k, (want, want_logits) in enumerate(wants):
        out = swappable.generate(PROMPTS[0], NEW, keep_logits=True, adapter=f"p{k}")
        assert_greedy_parity(want, want_logits, out.tokens[0], out.logits, f"swappable, pack {k}")
        row = 1 - k
        got = [x[row : row + 1] for x in rows.logits]
        assert_greedy_parity(want, want_logits, rows.tokens[row], got, f"routed, adapter {k}")


@pytest.mark.slow
def test_streamed_export_generates_the_in_memory_exports_tokens(lm_config, tmp_path):
    """--stream on a saved Gemma 3 form (safetensors): the weightless capture takes the same windowed masks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporters.stream import export_streamed
    from surgery.meta import capture_meta
    from surgery.pipeline import open_model

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lm_config("gemma3").parent)).save_pretrained(
        tmp_path / "lm"
    )

    def bottlenecks(captured):
        adapt(captured, AdapterSpec("houlsby", r=4), seed=0)
        stand_in_weights(captured.gm, seed=3)
        return captured

    streamed = export_streamed(bottlenecks(capture_meta(str(tmp_path / "lm"))), tmp_path / "s.onnx")
    assert streamed.blocks is not None and streamed.blocks.ok, streamed.blocks.summary()
    eager = bottlenecks(open_model(str(tmp_path / "lm")))
    export_onnx(eager.gm, eager.signature, tmp_path / "m.onnx")
    want = Generator(tmp_path / "m.onnx").generate(PROMPTS, NEW, keep_logits=True)
    got = Generator(streamed.path).generate(PROMPTS, NEW, keep_logits=True)
    assert got.tokens == want.tokens
    for step, (a, b) in enumerate(zip(want.logits, got.logits)):
        parity = compare([a], [b], names=["logits"], where=f"step {step}")
        assert parity.ok, parity.summary()
