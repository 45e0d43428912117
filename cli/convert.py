"""`surgery convert`: a GGUF file into a Hugging Face folder (config.json, tokenizer, safetensors shards), streamed
tensor by tensor (surgery/gguf_convert.py), so that `export --stream` and every other command can take it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli.common import emit_json, err, out, stage
from cli.options import Json
from surgery.gguf_convert import check_target, convert_gguf


def convert(
    source: Annotated[str, typer.Argument(help="The .gguf file (llama.cpp's format) to convert.")],
    output: Annotated[str, typer.Argument(help="The Hugging Face folder to write (must not exist).")],
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Weights in auto (fp16/bf16 where the GGUF stores every matrix so, else fp32), fp32, fp16 or bf16.",
        ),
    ] = "auto",
    json: Json = False,
) -> None:
    """Convert a GGUF file into a Hugging Face folder, tensor by tensor (memory does not grow with the model)."""
    check_target(output)
    label = f"convert {source} into {output}"
    with stage(label), Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("dequantize tensors", total=None)
        result = convert_gguf(source, output, dtype, progress=lambda i, n: bar.update(task, completed=i, total=n))
    if json:
        emit_json(result.to_json())
        return
    out.print(
        f"wrote {result.folder}: {result.model_type}, {result.parameters / 1e6:.0f}M parameters in {result.dtype} "
        f"({result.bytes / 1e9:.2f} GB in {result.shards} safetensors shard{'s' * (result.shards > 1)}), "
        f"{'tokenizer.json' if result.tokenizer else 'no tokenizer (the GGUF holds none)'}, {result.seconds:.1f} s"
    )
