"""One small adapted model per session (a 2-layer BERT of width 32 with random weights), and the files made from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.adapters import AdapterSpec, LoraSpec
from surgery.capture import Captured
from surgery.pipeline import open_model, stand_in_adapted

BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="session")
def small_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("bert")
    BertConfig(**BERT).save_pretrained(folder)
    return folder / "config.json"


@pytest.fixture(scope="session")
def small_base(small_bert: Path) -> Captured:
    return open_model(str(small_bert))


@pytest.fixture(scope="session")
def adapted_pt2(small_base: Captured, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Houlsby r=4 .adapted.pt2 with distinct random adapter weights, written by this tool."""
    path = tmp_path_factory.mktemp("adapted") / "small.adapted.pt2"
    stand_in_adapted(small_base, AdapterSpec("houlsby", r=4), path, seed=0, weights_seed=7)
    return path


@pytest.fixture(scope="session")
def lora_pt2(small_base: Captured, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "small.lora.adapted.pt2"
    stand_in_adapted(small_base, LoraSpec({"q": 2, "v": 2}), path, seed=1, weights_seed=8)
    return path
