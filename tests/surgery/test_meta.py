"""Capture without weights (surgery/meta.py): the same graph and sites as the eager capture, at the cost of none of
the base weights."""

from __future__ import annotations

import pytest
import torch

from surgery.adapters import parse_spec
from surgery.errors import SurgeryError
from surgery.insert import sites_for
from surgery.meta import Checkpoint, capture_meta, is_fake
from surgery.pipeline import open_model
from tests.checkpoints import write_checkpoint

TASK = "feature-extraction"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> its checkpoint folder, written on first use."""
    made = {}

    class Folders(dict):
        def __missing__(self, family):
            made[family] = write_checkpoint(tmp_path_factory.mktemp(family), family)
            return made[family]

    return Folders()


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_fake_capture_gives_the_eager_graph_and_sites(folders, family):
    fake = capture_meta(str(folders[family]), task=TASK)
    eager = open_model(str(folders[family]), task=TASK)
    assert [str(n.target) for n in fake.gm.graph.nodes] == [str(n.target) for n in eager.gm.graph.nodes]
    assert fake.signature == eager.signature
    for spec in (parse_spec("lora", "8"), parse_spec("houlsby", "4")):
        want = sites_for(eager.gm, eager.source.model_type, spec)
        assert [(s.path, s.width, s.role) for s in sites_for(fake.gm, fake.source.model_type, spec)] == [
            (s.path, s.width, s.role) for s in want
        ]
    params = dict(fake.gm.named_parameters())
    assert params and all(is_fake(p) for p in params.values())  # no base weight was read
    assert set(fake.keys) == set(params)
    checkpoint = Checkpoint.of(folders[family])
    assert len(set(checkpoint.shards.values())) > 1  # the sharded layout, through its index
    assert all(k in checkpoint.shards for k in fake.keys.values())


@pytest.mark.slow
def test_fake_capture_takes_the_dtype(folders):
    fake = capture_meta(str(folders["llama"]), dtype="bf16", task=TASK)
    assert fake.dtype == torch.bfloat16
    assert {p.dtype for p in fake.gm.parameters()} == {torch.bfloat16}


def test_fake_capture_refuses_a_folder_without_safetensors(tmp_path, folders):
    (tmp_path / "config.json").write_text((folders["llama"] / "config.json").read_text())
    with pytest.raises(SurgeryError, match="no safetensors weights"):
        capture_meta(str(tmp_path), task=TASK)
    with pytest.raises(SurgeryError, match="Hugging Face folder"):
        capture_meta(str(tmp_path / "config.json"), task=TASK)
