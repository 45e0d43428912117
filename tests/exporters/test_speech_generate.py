"""Whisper transcription (`--task automatic-speech-recognition`, surgery/speech.py, exporters/speech.py,
runtime/speech.py): a tiny random Whisper with Houlsby adapters of distinct random weights, exported as its encoder
and decoder pair; ONNX Runtime's greedy loop (encoder once, decoder with its cache) against a torch loop over the
Hugging Face model's own forward, with the same adapters hooked on its site modules (an independent placement), run on
the whole decoder sequence at every step (no cache): the same tokens, and the logits within tolerance at every step."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.adapters import AdapterSpec, stand_in_weights
from surgery.bundle import Manifest, adapted_manifest
from surgery.capture import capture
from surgery.graph import adapter_target
from surgery.load import load
from surgery.pipeline import adapt
from surgery.task_names import SPEECH_RECOGNITION
from tests.families import FAMILIES
from tests.surgery.test_speech import WHISPER_SITES

NEW = 14  # greedy steps compared
ATOL = 1e-4
PARTS = ("encoder", "decoder")
FORCED = [[1, 5], [2, 6], [4, 9]]  # a forced prefix (5, 6); position 3 is a gap, so 9 is not part of it


def write_asr_config(folder: Path) -> Path:
    """The tiny Whisper of tests/families.py saved as `WhisperForConditionalGeneration` (so the default task is
    speech recognition), with a wide init: logits that change from step to step."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "whisper",
        **FAMILIES["whisper"],
        init_std=0.2,
        architectures=["WhisperForConditionalGeneration"],
        forced_decoder_ids=FORCED,
    )
    config.save_pretrained(folder)
    return folder / "config.json"


def features(batch: int, seed: int) -> np.ndarray:
    row = FAMILIES["whisper"]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, row["num_mel_bins"], 2 * row["max_source_positions"])).astype(np.float32)


def torch_greedy(model: torch.nn.Module, frames: np.ndarray, start: list[int], steps: int):
    """Greedy tokens and each step's last-position logits from the HF model's forward on the whole sequence."""
    ids = torch.tensor([start] * frames.shape[0])
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_features=torch.from_numpy(frames), decoder_input_ids=ids, use_cache=False)
            last = out.logits[:, -1, :]
            token = last.argmax(-1)
            tokens.append(token.numpy())
            logits.append(last.numpy())
            ids = torch.cat([ids, token[:, None]], 1)
    return np.stack(tokens, 1), logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(the HF model with the adapters hooked, the hooked adapters by site, the decoder's path, the adapted model
    with its manifest)."""
    from exporters.speech import export_speech

    folder = tmp_path_factory.mktemp("asr")
    loaded = load(str(write_asr_config(folder)))
    assert loaded.task == SPEECH_RECOGNITION  # the default for WhisperForConditionalGeneration
    captured = capture(loaded)
    adapted = dataclasses.replace(captured, gm=copy.deepcopy(captured.gm))
    report = adapt(adapted, AdapterSpec("houlsby", r=4), seed=1)
    assert [(s.path, s.role) for s in report.sites] == WHISPER_SITES  # the feature-extraction capture's sites
    stand_in_weights(adapted.gm, seed=7)
    hf = loaded.module.hf
    adapters = {s.path: adapted.gm.get_submodule(adapter_target(s)) for s in report.sites}
    for path, a in adapters.items():
        loaded.module.get_submodule(path).register_forward_hook(lambda m, i, out, a=a: a(out))  # the HF model's own
    result = export_speech(adapted, folder / "asr.onnx")
    assert result.encoder.parity.ok and result.decoder.parity.ok
    manifest = adapted_manifest(adapted, AdapterSpec("houlsby", r=4), report)
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))).decoding == adapted.decoding is not None
    adapted.manifest = manifest
    return hf, adapters, result.decoder.path, adapted


def test_greedy_transcription_matches_the_models_forward(exported):
    """Two clips, 14 greedy steps after the start token: ORT's tokens equal torch's, logits within 1e-4 at every
    step; each graph holds its own blocks' adapters only."""
    import onnx

    from runtime.speech import Transcriber

    hf, adapters, decoder, _ = exported
    row = FAMILIES["whisper"]
    frames = features(2, seed=3)
    start = [row["decoder_start_token_id"]]
    got = Transcriber(decoder).transcribe(frames, start, max_new_tokens=NEW, keep_logits=True)
    want_tokens, want_logits = torch_greedy(hf, frames, start, NEW)
    assert got.steps == NEW
    np.testing.assert_array_equal(np.array(got.tokens), want_tokens)
    assert len({tuple(r) for r in want_tokens.T}) > 3  # the tokens change from step to step
    diffs = [float(np.abs(g - w).max()) for g, w in zip(got.logits, want_logits)]
    scale = max(float(np.abs(w).max()) for w in want_logits)
    assert max(diffs) <= ATOL + 1e-4 * scale, diffs

    names = {p: [i.name for i in onnx.load(str(decoder.with_name(f"asr.{p}.onnx"))).graph.initializer]
             for p in ("encoder", "decoder")}  # fmt: skip
    assert any("adapters.encoder" in n for n in names["encoder"]) and not any("decoder" in n for n in names["encoder"])


@pytest.mark.parametrize("site", ["encoder.layers.1.fc2", "decoder.layers.0.encoder_attn.out_proj"])
def test_a_changed_adapter_changes_what_torch_computes(exported, site):
    """The comparison sees one adapter: scaling one up-projection (an encoder block's, a decoder block's) by 1.05 on
    the torch side moves its logits past the tolerance the export meets."""
    from runtime.speech import Transcriber

    hf, adapters, decoder, _ = exported
    frames = features(1, seed=4)
    start = [FAMILIES["whisper"]["decoder_start_token_id"]]
    got = Transcriber(decoder).transcribe(frames, start, max_new_tokens=3, keep_logits=True)
    up = dict(adapters[site].named_parameters())
    name = next(n for n in up if "up" in n and up[n].dim() == 2)
    with torch.no_grad():
        up[name].mul_(1.05)
    try:
        _, want = torch_greedy(hf, frames, start, 3)
    finally:
        with torch.no_grad():
            up[name].div_(1.05)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got.logits, want)) > 10 * ATOL


def test_the_graphs_carry_their_start_and_stop_tokens(exported, tmp_path):
    """Both graphs' metadata hold the config's start token, the forced prefix up to its first gap, the end token and
    the decoder's positions; `transcribe` with no start tokens uses them. A pair whose metadata was stripped is
    refused with a message naming --config."""
    import onnx

    from runtime.errors import SurgeryError
    from runtime.speech import Decoding, Transcriber

    decoder = exported[2]
    row = FAMILIES["whisper"]
    want = Decoding(row["decoder_start_token_id"], (5, 6), (row["eos_token_id"],), row["max_target_positions"])
    for part in ("encoder", "decoder"):
        meta = {p.key: p.value for p in onnx.load(str(decoder.with_name(f"asr.{part}.onnx"))).metadata_props}
        assert Decoding.from_metadata(meta, part) == want
    t = Transcriber(decoder)
    assert t.decoding == want and t.max_positions == want.max_positions
    frames = features(1, seed=6)
    assert t.transcribe(frames, max_new_tokens=4).tokens == t.transcribe(frames, [2, 5, 6], 4, [4]).tokens

    for part in ("encoder", "decoder"):
        proto = onnx.load(str(decoder.with_name(f"asr.{part}.onnx")))
        del proto.metadata_props[:]
        onnx.save(proto, str(tmp_path / f"bare.{part}.onnx"))
    with pytest.raises(SurgeryError, match="--config"):
        Transcriber(tmp_path / "bare.decoder.onnx").transcribe(frames, max_new_tokens=2)


def test_a_swappable_pair_runs_a_pack_of_other_weights(exported, tmp_path):
    """--swappable: each graph holds the slots of its own sites; one pack of every site, made from a second set of
    distinct random adapter weights and saved to a file, splits between them, and the greedy loop with it active
    matches torch with those weights (tokens equal, logits within 1e-4), and differs from the model's own weights."""
    from exporters.speech import export_speech_swappable
    from runtime.errors import SurgeryError
    from runtime.speech import Transcriber
    from surgery.packs import pack_from_model, save_pack
    from surgery.sites import ADAPTER_ROOT

    hf, adapters, baked, adapted = exported
    result = export_speech_swappable(adapted, tmp_path / "asr.swappable.onnx")
    t = Transcriber(result.decoder.path)
    encoder_sites, decoder_sites = (set(p.widths) for p in t.parts)
    assert encoder_sites == {p for p in adapters if p.startswith("encoder.")}
    assert decoder_sites == {p for p in adapters if p.startswith("decoder.")}

    saved = {n: p.detach().clone() for n, p in adapted.gm.named_parameters() if n.startswith(ADAPTER_ROOT + ".")}
    frames, start = features(2, seed=8), [FAMILIES["whisper"]["decoder_start_token_id"]]
    stand_in_weights(adapted.gm, seed=21)  # the hooked adapters are these modules: torch computes with them too
    try:
        pack = save_pack(pack_from_model(adapted.gm.state_dict(), adapted.manifest), tmp_path / "b.onnx_adapter")
        want_tokens, want_logits = torch_greedy(hf, frames, start, 8)
    finally:
        with torch.no_grad():
            for n, p in adapted.gm.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
    t.load("b", pack)
    got = t.transcribe(frames, start, 8, stop_tokens=[], keep_logits=True, adapter="b")
    np.testing.assert_array_equal(np.array(got.tokens), want_tokens)
    scale = max(float(np.abs(w).max()) for w in want_logits)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got.logits, want_logits)) <= ATOL + 1e-4 * scale
    own = Transcriber(baked).transcribe(frames, start, 8, stop_tokens=[], keep_logits=True)
    assert max(float(np.abs(g - w).max()) for g, w in zip(got.logits, own.logits)) > 10 * ATOL
    with pytest.raises(SurgeryError, match="no adapter slots"):
        Transcriber(baked).load("b", pack)


def test_a_speech_source_is_known_before_capture(exported):
    """What `export --stream` and the budget's switch to streaming refuse, read from the config (or --task)."""
    from surgery.speech import is_speech_source

    folder = exported[2].parent
    assert is_speech_source(str(folder), None) and is_speech_source(str(folder / "config.json"), None)
    assert not is_speech_source(str(folder), "feature-extraction") and is_speech_source(None, SPEECH_RECOGNITION)
    assert not is_speech_source(str(exported[2]), None)  # an ONNX file: neither a .pt2 nor a folder


def test_the_transcriber_refuses_features_of_another_length(exported):
    from runtime.errors import SurgeryError
    from runtime.speech import Transcriber

    with pytest.raises(SurgeryError, match="log-mel frames"):
        Transcriber(exported[2]).transcribe(np.zeros((1, 16, 63), np.float32), [2])


@pytest.mark.slow
def test_cli_inserts_exports_and_transcribes(tmp_path, cli):
    """`surgery insert`, `surgery export`, `surgery generate --features` as a user runs them, on a config folder;
    the tokens equal the in-process Transcriber's over the same files."""
    from runtime.speech import Transcriber
    from surgery.bundle import save_program
    from surgery.pipeline import open_model

    folder = tmp_path / "whisper"
    write_asr_config(folder)
    run = cli("insert", "--r", "4", str(folder / "config.json"), "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert run.json["task"] == SPEECH_RECOGNITION and run.json["sites"] == [p for p, _ in WHISPER_SITES]
    pt2 = tmp_path / run.json["output"]
    adapted = open_model(str(pt2))  # a trained model's stand-in: distinct random adapter weights
    stand_in_weights(adapted.gm, seed=3)
    save_program(pt2, adapted.gm, adapted.manifest)
    run = cli("export", str(pt2), "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    encoder, decoder = map(Path, run.json["onnx"])
    assert encoder.name == "whisper.adapted.encoder.onnx" and run.json["max_abs_diff"] <= ATOL
    np.save(tmp_path / "f.npy", features(1, seed=5))
    run = cli("generate", str(tmp_path / decoder), "--features", "f.npy", "--max-new-tokens", "12", "--json",
              cwd=tmp_path)  # fmt: skip
    assert run.code == 0, run.stderr  # no --config: the start tokens come from the graphs' metadata
    config = json.loads((folder / "config.json").read_text())
    start = [config["decoder_start_token_id"], 5, 6]
    want = Transcriber(tmp_path / decoder).transcribe(features(1, seed=5), start, 12, [config["eos_token_id"]])
    assert run.json["start_tokens"] == start and run.json["tokens"] == want.tokens

    run = cli("export", str(pt2), "--swappable", "--json", cwd=tmp_path)  # slots, and the model's own pack
    assert run.code == 0, run.stderr
    assert [Path(p).name for p in run.json["onnx"]] == [f"whisper.adapted.swappable.{p}.onnx" for p in PARTS]
    assert cli("pack", str(pt2), "-o", "own.onnx_adapter", cwd=tmp_path).code == 0
    swappable = tmp_path / run.json["onnx"][1]
    run = cli("generate", str(swappable), "--features", "f.npy", "--adapter", "own.onnx_adapter",
              "--max-new-tokens", "12", "--json", cwd=tmp_path)  # fmt: skip
    assert run.code == 0 and run.json["tokens"] == want.tokens, run.stderr

    other = tmp_path / "other"  # --config overrides the metadata
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "decoder_start_token_id": 7, "forced_decoder_ids": None}))
    run = cli("generate", str(tmp_path / decoder), "--features", "f.npy", "--config", str(other),
              "--max-new-tokens", "3", "--json", cwd=tmp_path)  # fmt: skip
    assert run.code == 0 and run.json["start_tokens"] == [7], run.stderr


@pytest.mark.slow
def test_cli_merges_a_lora_and_refuses_streaming_and_training(tmp_path, cli, monkeypatch):
    """A LoRA speech recognizer merges (and the merged model exports and transcribes from its metadata); --stream,
    the budget's switch to streaming and `surgery train` refuse it in one line, writing nothing."""
    from runtime.speech import Transcriber
    from surgery.bundle import save_program
    from surgery.pipeline import open_model

    folder = tmp_path / "whisper"
    write_asr_config(folder)
    run = cli(
        "insert", "--method", "lora", "--r", "4", str(folder / "config.json"), "-o", "w.adapted.pt2", cwd=tmp_path
    )
    assert run.code == 0, run.stderr
    adapted = open_model(str(tmp_path / "w.adapted.pt2"))
    stand_in_weights(adapted.gm, seed=11)  # B != 0: the merge changes the weights
    save_program(tmp_path / "w.adapted.pt2", adapted.gm, adapted.manifest)
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
    before = set(tmp_path.iterdir())
    refusals = {
        "--stream": (("export", "w.adapted.pt2", "--stream"), {}),
        "--stream folder": (("export", str(folder), "--stream"), {}),
        "budget": (("export", "w.adapted.pt2"), {"SURGERY_MEMORY_BUDGET": "1M"}),
        "train": (("train", "w.adapted.pt2", "--data", "d.jsonl"), {}),
    }
    for what, (args, env) in refusals.items():
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            run = cli(*args, cwd=tmp_path)
        lines = run.stderr.strip().splitlines()
        assert run.code == 2 and len(lines) == 1 and "Traceback" not in run.stderr, (what, run.stderr)
        assert SPEECH_RECOGNITION in lines[0], (what, lines[0])
        assert set(tmp_path.iterdir()) == before, what

    run = cli("merge", "w.adapted.pt2", "-o", "m.adapted.pt2", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    run = cli("export", "m.adapted.pt2", "--json", cwd=tmp_path)
    assert run.code == 0 and run.json["max_abs_diff"] <= ATOL, run.stderr
    merged, unmerged = tmp_path / "m.adapted.decoder.onnx", tmp_path / "w.adapted.decoder.onnx"
    run = cli("export", "w.adapted.pt2", cwd=tmp_path)
    assert run.code == 0, run.stderr
    frames = features(2, seed=12)
    got = Transcriber(merged).transcribe(frames, max_new_tokens=6, keep_logits=True)
    want = Transcriber(unmerged).transcribe(frames, max_new_tokens=6, keep_logits=True)
    assert got.tokens == want.tokens
    assert max(float(np.abs(g - w).max()) for g, w in zip(got.logits, want.logits)) <= ATOL
