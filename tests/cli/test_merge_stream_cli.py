"""`surgery merge PEFT_FOLDER --stream --base FOLDER`: a PEFT LoRA merged into a sharded checkpoint on disk
(surgery/merge_stream.py) from the command line, as a subprocess. The merged folder equals the in-memory merge
(import-peft then merge) tensor by tensor and PEFT's own `merge_and_unload` within float rounding; bad input is one
line and exit 2, with nothing written. The merge itself is slow tier (a subprocess of about 15 s here)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from surgery.merge import merge_adapters
from surgery.peft_import import import_peft
from surgery.pipeline import open_model
from tests.checkpoints import read_checkpoint, write_checkpoint

TARGETS = ["q_proj", "v_proj", "down_proj"]


def lora_folder(folder, tensors):
    """A PEFT LoRA folder written by hand: its config and `tensors` (PEFT's names)."""
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize(
    "source, base, output, message",
    [
        pytest.param("empty", "not-hf", "out", "no LoRA tensors", marks=pytest.mark.slow),
        pytest.param("lora", "not-hf", "out", "Hugging Face folder", marks=pytest.mark.slow),
        pytest.param("lora", "not-hf", "taken", "exists", marks=pytest.mark.slow),
    ],
    ids=["no LoRA in the source", "not a HF folder", "output exists"],
)  # slow tier (the CLI error paths): each is a CLI process, about 4-6 s of imports here
def test_streamed_merge_refusals_are_one_line(cli, tmp_path, source, base, output, message):
    lora_folder(
        tmp_path / "lora",
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 2),
        },
    )
    lora_folder(tmp_path / "empty", {})
    (tmp_path / "not-hf").mkdir()
    (tmp_path / "taken").mkdir()
    run = cli("merge", source, "--stream", "--base", base, "-o", output, cwd=tmp_path)
    assert run.code == 2 and "Traceback" not in run.stderr, run.stderr
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "lora", "not-hf", "taken"]  # nothing written


@pytest.mark.slow
def test_cli_streamed_merge_equals_the_in_memory_merge_and_peft(cli, tmp_path):
    peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
    from transformers import AutoModelForCausalLM

    folder = write_checkpoint(tmp_path / "base", "llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)  # B random, non-zero
    pm = peft.get_peft_model(model, config).eval()
    pm.save_pretrained(tmp_path / "lora")
    theirs = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}
    run = cli("merge", "lora", "--stream", "--base", "base", "-o", "merged", "--json", cwd=tmp_path)
    assert run.code == 0, run.stderr
    assert len(run.json["merged"]) == 6 and run.json["ranks"] == [4]  # q, v and down_proj of two layers
    eager = open_model(str(folder))
    import_peft(eager, tmp_path / "lora")
    merge_adapters(eager.gm)
    ours = {n: p.detach() for n, p in eager.gm.named_parameters()}
    before, after = read_checkpoint(folder), read_checkpoint(tmp_path / "merged")
    assert set(after) == set(before)
    for key, tensor in after.items():
        assert torch.equal(tensor, ours[key]), key  # the in-memory merge, exactly
        torch.testing.assert_close(tensor, theirs[key], rtol=1e-5, atol=1e-6)  # PEFT's, within rounding
        assert torch.equal(tensor, before[key]) == (key not in run.json["merged"]), key
    again = cli("merge", "lora", "--stream", "--base", "base", "-o", "merged", cwd=tmp_path)
    assert again.code == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
