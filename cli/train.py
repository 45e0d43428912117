"""`surgery train`: train an adapted model's adapters (and head) on a data file, save the result as .adapted.pt2."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cli.common import emit_json, err, out, step
from cli.options import Adapted, Json, Output, Task, with_help
from surgery.bundle import SUFFIX
from surgery.errors import SurgeryError
from surgery.io import check_output
from surgery.train import Step, TrainConfig, TrainResult, prepare, train as train_model


def train(
    model: Adapted,
    data: Annotated[str, typer.Option("--data", help="Training data: .jsonl, .csv or .parquet.")],
    output: with_help(Output, "The trained .adapted.pt2 (atomic).") = None,
    eval_data: Annotated[
        Optional[str], typer.Option("--eval", help="Held-out data, evaluated after each epoch; the best epoch is kept.")
    ] = None,
    task: with_help(Task, "seq-cls, token-cls or causal-lm (default: the model's head).") = None,
    text_field: Annotated[
        Optional[str], typer.Option("--text-field", help="Field of the text (default: text; token-cls: tokens).")
    ] = None,
    label_field: Annotated[
        Optional[str], typer.Option("--label-field", help="Field of the label (default: label; token-cls: tags).")
    ] = None,
    pair_field: Annotated[
        Optional[str], typer.Option("--pair-field", help="seq-cls: field of a second text (sentence pairs).")
    ] = None,
    prompt_field: Annotated[
        Optional[str],
        typer.Option("--prompt-field", help="causal-lm: field of a prompt; the loss covers the text only."),
    ] = None,
    tokenizer: Annotated[
        Optional[str], typer.Option("--tokenizer", help="Tokenizer folder (default: the model's source folder).")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the data.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per batch.")] = 16,
    accumulation: Annotated[int, typer.Option("--accumulation", help="Batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate of AdamW.")] = 5e-4,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW's, on weights (not biases, norms).")
    ] = 0.01,
    warmup: Annotated[float, typer.Option("--warmup", help="Share of the steps warming up; then linear decay.")] = 0.06,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Clip gradients' norm (0: off).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps.")] = None,
    max_length: Annotated[
        Optional[int], typer.Option("--max-length", help="Tokens per example (default: the model's positions).")
    ] = None,
    num_labels: Annotated[
        Optional[int], typer.Option("--num-labels", help="A new classification head of this many classes.")
    ] = None,
    train_norms: Annotated[bool, typer.Option("--train-norms", help="Train the layer norms too.")] = False,
    no_dropout: Annotated[bool, typer.Option("--no-dropout", help="Train without dropout (parity runs).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of data order, dropout and a new head.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")] = "auto",
    no_bf16: Annotated[
        bool, typer.Option("--no-bf16", help="On CUDA, train in fp32 (default: bf16 autocast).")
    ] = False,
    save_every: Annotated[int, typer.Option("--save-every", help="Keep the run's state every N steps too.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the stopped run of this output.")] = False,
    json: Json = False,
) -> None:
    """Train the adapters (and a classification head) of an adapted model on JSONL, CSV or Parquet data."""
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        accumulation=accumulation,
        lr=lr,
        weight_decay=weight_decay,
        warmup=warmup,
        max_grad_norm=max_grad_norm,
        seed=seed,
        max_steps=max_steps,
        max_length=max_length,
        train_norms=train_norms,
        num_labels=num_labels,
        dropout=not no_dropout,
        bf16=not no_bf16,
        device=device,
        save_every=save_every,
    )
    path = check_output(output or model.removesuffix(SUFFIX).removesuffix(".pt2") + ".trained" + SUFFIX)
    if str(path) == model:
        raise SurgeryError(f"-o {path}: the output would overwrite the model being trained; choose another -o")
    fields = {"text": text_field, "label": label_field, "pair": pair_field, "prompt": prompt_field}
    with step(f"open {model} and read {data}"):
        prepared = prepare(model, data, eval_data, task, fields, config, tokenizer)
    m = prepared.model
    if not json:
        share = 100 * m.trainable_count() / m.base_parameters
        out.print(
            f"{prepared.task}: {len(prepared.train.examples):,} examples"
            + (f", {len(prepared.eval.examples):,} to evaluate" if prepared.eval else "")
            + f"; training {m.trainable_count():,} parameters, {share:.2f}% of the base's {m.base_parameters:,} "
            f"on {prepared.device}"
        )
    progress = Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:.1f} ex/s"),
        TimeRemainingColumn(),
        console=err,
        disable=json,
    )
    with progress:
        bar = progress.add_task("train", total=None, epoch=1, loss=float("nan"), speed=0.0)

        def on_step(s: Step) -> None:
            progress.update(
                bar, completed=s.step, total=s.total, epoch=s.epoch + 1, loss=s.loss, speed=s.examples_per_s
            )

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            progress.console.print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

        result = train_model(prepared, config, path, resume=resume, on_step=on_step, on_epoch=on_epoch)
    _report(result, json)
    if result.interrupted:
        raise typer.Exit(130)


def _report(r: TrainResult, json: bool) -> None:
    if json:
        emit_json(r.to_json())
        return
    if r.interrupted:
        err.print(
            f"[yellow]interrupted[/] at step {r.steps} of {r.total_steps}; the run's state is in {r.state}: "
            "continue with the same command and --resume"
        )
        return
    first = r.losses[0] if r.losses else float("nan")
    out.print(
        f"{r.steps} steps, {r.examples:,} examples ({r.epochs:g} epochs) in {r.seconds:.1f} s, "
        f"{r.examples_per_s:.1f} examples/s; loss {first:.4f} -> {r.metrics['final_step_loss']:.4f}"
    )
    shown = {k: v for k, v in r.metrics.items() if k.startswith("eval_")}
    if shown:
        best = f" (best epoch {r.best_epoch + 1})" if r.best_epoch is not None else ""
        out.print("eval" + best + ": " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in shown.items()))
    if r.truncated:
        out.print(f"[yellow]{r.truncated} texts longer than the model's positions were truncated[/]")
    out.print(f"trainable {r.trainable:,} of the base's {r.base:,} parameters ({100 * r.share:.2f}%)")
    out.print(f"wrote {r.output}")
