"""`surgery export-peft`: a LoRA adapted model as a PEFT adapter folder."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import emit_json, out, step
from cli.options import Json, Output, Trust
from surgery.peft_export import peft_folder, write_peft
from surgery.pipeline import default_output, open_adapted


def export_peft(
    source: Annotated[str, typer.Argument(help="A LoRA .adapted.pt2 (surgery insert --method lora, or an import).")],
    output: Output = None,
    json: Json = False,
    trust: Trust = False,
) -> None:
    """Write a LoRA adapted model's adapters as a PEFT folder: PeftModel.from_pretrained(base, folder) loads it."""
    folder = output or str(default_output(source, ".peft"))
    with step(f"load {source}"):
        captured, spec, sites = open_adapted(source, trust=trust)
    result = peft_folder(captured.gm, spec, sites, captured.source.model_type, captured.source.name)
    with step(f"write {folder}"):
        write_peft(result, folder)
    info = {
        "output": folder,
        "target_modules": result.config["target_modules"],
        "r": result.config["r"],
        "lora_alpha": result.config["lora_alpha"],
        "rank_pattern": result.config["rank_pattern"],
        "parameters": sum(t.numel() for t in result.tensors.values()),
    }
    if json:
        emit_json(info)
        return
    out.print(f"wrote {folder}: LoRA on {len(info['target_modules'])} modules, {info['parameters']:,} parameters")
