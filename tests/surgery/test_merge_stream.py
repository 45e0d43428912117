"""LoRA merged into a checkpoint on disk (surgery/merge_stream.py): the touched tensors equal the in-memory merge's
weights, every other byte is the source's, and the folder loads as a Hugging Face model again."""

from __future__ import annotations


import pytest
import torch

from surgery.adapters import parse_spec, stand_in_weights
from surgery.errors import SurgeryError
from surgery.merge import merge_adapters
from surgery.merge_stream import merge_lora_streamed
from surgery.meta import capture_meta
from surgery.pipeline import adapt, open_model
from tests.checkpoints import read_checkpoint, write_checkpoint

pytestmark = pytest.mark.slow
TASK = "feature-extraction"
SPEC = parse_spec("lora", "4", targets="q,v,ffn_out")


def adapted(captured, spec=SPEC):
    adapt(captured, spec, seed=0)
    stand_in_weights(captured.gm, seed=3)  # non-zero B: a zero LoRA merges to the base weights
    return captured


def test_streamed_merge_equals_the_in_memory_merge(tmp_path):
    folder = write_checkpoint(tmp_path / "base", "llama")
    fake = adapted(capture_meta(str(folder), task=TASK))
    result = merge_lora_streamed(fake, tmp_path / "merged")
    eager = adapted(open_model(str(folder), task=TASK))
    merge_adapters(eager.gm)
    before, after = read_checkpoint(folder), read_checkpoint(result.folder)
    assert set(before) == set(after)
    assert len(result.merged) == 6  # q, v and down_proj of two layers
    for name, key in fake.keys.items():
        assert torch.equal(after[key], eager.gm.get_parameter(name).detach()), key
        assert torch.equal(after[key], before[key]) == (key not in result.merged), key
    assert after["lm_head.weight"].equal(before["lm_head.weight"])  # not in the captured model: copied as is
    reopened = open_model(str(result.folder), task=TASK)  # a Hugging Face folder again
    tensors = eager.signature.examples()
    with torch.no_grad():
        torch.testing.assert_close(
            eager.signature.call(reopened.gm, tensors)[0], eager.signature.call(eager.gm, tensors)[0]
        )
    with pytest.raises(SurgeryError, match="exists"):
        merge_lora_streamed(fake, result.folder)
    bottleneck = adapted(capture_meta(str(folder), task=TASK), parse_spec("houlsby", "4"))
    with pytest.raises(SurgeryError, match="LoRA only"):
        merge_lora_streamed(bottleneck, tmp_path / "other")
    assert not (tmp_path / "other").exists()
