"""`surgery train`: adapters (and a classification head) trained on a data file, saved as an `.adapted.pt2`.

The loop is a plain torch one over `AdaptedModel` (adapted.py): AdamW (biases and norms exempt from weight decay,
as transformers' `Trainer` does), linear warmup then linear decay, gradient clipping and accumulation, dropout as
the base config has it (`train()`), bf16 autocast on CUDA. The data order comes from `seed` alone, so a CPU run
repeats bit for bit. After each epoch it evaluates; the best epoch's weights are the ones saved.

A run keeps its state (trainable weights, optimizer, schedule, position in the data, random state) in
`OUTPUT.state`, written atomically after each epoch, every `save_every` steps and on Ctrl-C (an optimizer step is
never cut in half: the interrupt waits for it). `resume=True` continues from there; a finished run removes it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from surgery.adapted import AdaptedModel, open_adapted_model
from surgery.bundle import Dataset, Training
from surgery.data import IGNORE, Encoded, Example, Fields, Labels, dataset, encode, head_labels, load_tokenizer
from surgery.data import read_rows
from surgery.errors import SurgeryError
from surgery.io import atomic_output, check_output
from surgery.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, SPEECH_RECOGNITION, TOKEN_CLASSIFICATION

TASK_ALIASES = {"seq-cls": SEQUENCE_CLASSIFICATION, "token-cls": TOKEN_CLASSIFICATION, "causal-lm": CAUSAL_LM}
TRAIN_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION, CAUSAL_LM)


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings; all of them land in the manifest's training record (`hyperparameters`)."""

    epochs: int = 3
    batch_size: int = 16
    accumulation: int = 1  # batches per optimizer step
    lr: float = 5e-4
    weight_decay: float = 0.01  # on weights, not on biases or norms
    warmup: float = 0.06  # share of the optimizer steps spent warming up linearly from 0 to lr
    max_grad_norm: float = 1.0  # clip the trainable gradients' global norm (0: no clipping)
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule decays over them)
    max_length: int | None = None  # tokens per example (default: the model's positions)
    train_norms: bool = False
    num_labels: int | None = None  # a new classification head of this many classes
    dropout: bool = True  # dropout as the base config has it while training (False: none, for parity runs)
    bf16: bool = True  # autocast to bf16 on CUDA
    device: str = "auto"
    save_every: int = 0  # also keep the run's state every N optimizer steps (0: after each epoch only)

    def __post_init__(self) -> None:
        checks = {
            "--epochs": self.epochs >= 1,
            "--batch-size": 1 <= self.batch_size,
            "--accumulation": self.accumulation >= 1,
            "--lr": self.lr > 0,
            "--weight-decay": self.weight_decay >= 0,
            "--warmup": 0 <= self.warmup < 1,
            "--max-grad-norm": self.max_grad_norm >= 0,
            "--max-steps": self.max_steps is None or self.max_steps >= 1,
            "--max-length": self.max_length is None or self.max_length >= 2,
            "--num-labels": self.num_labels is None or self.num_labels >= 2,
            "--save-every": self.save_every >= 0,
        }
        for option, ok in checks.items():
            if not ok:
                value = getattr(self, option[2:].replace("-", "_"))
                raise SurgeryError(f"{option} {value}: out of range; see surgery train --help")

    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("device", "save_every")}


@dataclass
class Step:
    """One optimizer step, for progress: its number, of how many, its loss, the learning rate, examples/s."""

    step: int
    total: int
    epoch: int
    loss: float
    lr: float
    examples_per_s: float


@dataclass
class TrainResult:
    output: str | None  # None: trained in memory only
    interrupted: bool
    state: str | None  # the state file of an interrupted run
    steps: int
    total_steps: int
    epochs: float
    examples: int
    trainable: int
    base: int
    losses: list[float]  # per optimizer step
    evals: list[dict[str, float]]  # per epoch
    best_epoch: int | None
    metrics: dict[str, float]
    truncated: int
    examples_per_s: float
    seconds: float
    labels: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.trainable / self.base

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "share": self.share, "labels": list(self.labels)}


@dataclass
class Prepared:
    """A model and its data, ready to train."""

    model: AdaptedModel
    task: str
    train: Encoded
    eval: Encoded | None
    data: Dataset
    eval_data: Dataset | None
    labels: Labels | None
    pad: int
    max_length: int
    device: torch.device
    extras: dict[str, Any] = field(default_factory=dict)


def resolve_task(task: str | None, model: AdaptedModel) -> str:
    task = TASK_ALIASES.get(task, task) if task else model.manifest.task
    if SPEECH_RECOGNITION in (task, model.manifest.task):
        raise SurgeryError(
            f"{model.path}: surgery train reads text data and does not train an {SPEECH_RECOGNITION} model; train "
            "its adapters in torch on torch.export.load(path).module()"
        )
    if task not in TRAIN_TASKS:
        raise SurgeryError(
            f"--task {task}: train one of seq-cls, token-cls, causal-lm; a {model.manifest.task} model has no head "
            "to train: insert into the base with --task sequence-classification (or token-classification, causal-lm)"
        )
    if task != model.manifest.task:
        raise SurgeryError(
            f"--task {task}: {model.path} was captured as {model.manifest.task}; insert adapters into the base "
            f"with --task {task}, or train it as {model.manifest.task}"
        )
    return task


def prepare(
    model_path: str,
    data: str,
    eval_data: str | None,
    task: str | None,
    fields: dict[str, str | None],
    config: TrainConfig,
    tokenizer: str | None = None,
) -> Prepared:
    """Open the model, read and tokenize the data, check labels: every refusal before any training."""
    rows = read_rows(data)
    eval_rows = read_rows(eval_data) if eval_data else None
    model = open_adapted_model(model_path)
    task = resolve_task(task, model)
    f = Fields.for_task(task, **fields)
    signature = model.manifest.signature
    allowed = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    other = [n for n in signature.names if n not in allowed and not n.startswith("past_key_values.")]
    if other:
        raise SurgeryError(f"{model_path}: takes {', '.join(other)}; train takes text models (input_ids) only")
    seq = signature.axes().get("seq")
    positions = seq.max if seq is not None else 512
    max_length = min(config.max_length or positions, positions)
    ids_spec = next(i for i in signature.inputs if i.name == "input_ids")
    tok = load_tokenizer(model.manifest.source.path, tokenizer, ids_spec.high)
    labels = None
    if task != CAUSAL_LM:
        if config.num_labels is not None:
            model.new_head(config.num_labels, seed=config.seed)
        classes = model.head_classes()
        assert classes is not None
        labels = head_labels(rows, f, task, classes, model.config, data)
    model.set_trainable(head=True, norms=config.train_norms)
    train_set = encode(rows, task, f, tok, max_length, labels, data)
    eval_set = encode(eval_rows, task, f, tok, max_length, labels, eval_data) if eval_rows and eval_data else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    )
    return Prepared(
        model,
        task,
        train_set,
        eval_set,
        dataset(data, rows),
        dataset(eval_data, eval_rows) if eval_rows and eval_data else None,
        labels,
        pad,
        max_length,
        device,
    )


def collate(p: Prepared, examples: list[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A padded batch (right padding, to the longest row or the graph's shortest sequence) and its labels."""
    signature = p.model.manifest.signature
    seq = signature.axes().get("seq")
    width = max(max(len(e.ids) for e in examples), seq.min if seq is not None else 1)
    ids = torch.full((len(examples), width), p.pad, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
    if p.task == SEQUENCE_CLASSIFICATION:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.ids)] = torch.tensor(e.label)
    inputs: dict[str, torch.Tensor] = {}
    for spec in signature.inputs:
        if spec.name == "input_ids":
            inputs[spec.name] = ids
        elif spec.name == "attention_mask":
            inputs[spec.name] = mask
        elif spec.name == "token_type_ids":
            inputs[spec.name] = torch.zeros_like(ids)
        elif spec.name == "position_ids":
            inputs[spec.name] = (mask.cumsum(1) - 1).clamp(min=0)
        else:  # an empty KV cache: (batch, kv_heads, 0, head_dim)
            shape = (len(examples), spec.shape[1], 0, *spec.shape[3:])
            inputs[spec.name] = torch.zeros(shape, dtype=spec.torch_dtype)
    return {k: v.to(p.device) for k, v in inputs.items()}, labels.to(p.device)


def logits_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        return outputs["logits"]
    return outputs[0]


def loss_of(task: str, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy: per row (sequence classification), per labelled token, or per next token (causal LM)."""
    logits = logits.float()
    if task == SEQUENCE_CLASSIFICATION:
        return F.cross_entropy(logits, labels, reduction=reduction)
    if task == CAUSAL_LM:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction=reduction
    )


def _autocast(p: Prepared, config: TrainConfig):  # noqa: ANN202
    return torch.autocast(p.device.type, dtype=torch.bfloat16, enabled=p.device.type == "cuda" and config.bf16)


def evaluate(p: Prepared, config: TrainConfig, examples: list[Example] | None = None) -> dict[str, float]:
    """Loss and accuracy / macro F1 (classification, over labelled tokens for token classification), or perplexity."""
    examples = examples if examples is not None else p.eval.examples if p.eval else []
    model = p.model
    was = model.module.training
    model.eval()
    nll, count = 0.0, 0
    preds: list[torch.Tensor] = []
    golds: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(examples), config.batch_size):
            inputs, labels = collate(p, examples[start : start + config.batch_size])
            with _autocast(p, config):
                logits = logits_of(model.module(**inputs))
            nll += float(loss_of(p.task, logits, labels, reduction="sum"))
            if p.task == CAUSAL_LM:
                count += int((labels[:, 1:] != IGNORE).sum())
                continue
            keep = labels != IGNORE
            preds.append(logits.argmax(-1)[keep].cpu())
            golds.append(labels[keep].cpu())
            count += int(keep.sum())
    model.train(was)
    count = max(count, 1)
    metrics = {"eval_loss": nll / count}
    if p.task == CAUSAL_LM:
        metrics["eval_perplexity"] = math.exp(min(nll / count, 700.0))
        return metrics
    pred, gold = torch.cat(preds), torch.cat(golds)
    metrics["eval_accuracy"] = float((pred == gold).float().mean())
    f1s = []
    for c in sorted(set(gold.tolist()) | set(pred.tolist())):
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    metrics["eval_f1"] = sum(f1s) / len(f1s)
    return metrics


def better(task: str, new: dict[str, float], old: dict[str, float] | None) -> bool:
    if old is None:
        return True
    if task == CAUSAL_LM:
        return new["eval_loss"] < old["eval_loss"]
    return (new["eval_accuracy"], -new["eval_loss"]) > (old["eval_accuracy"], -old["eval_loss"])


def _close_epoch(
    p: Prepared,
    config: TrainConfig,
    epoch: int,
    losses: list[float],
    evals: list[dict[str, float]],
    best: dict[str, Any] | None,
    params: dict[str, torch.Tensor],
) -> dict[str, Any] | None:
    """The end of an epoch (or of the steps where --max-steps stops within one): its metrics appended to `evals`, with
    the mean of its step `losses`; returns the best so far, a copy of `params` where this epoch is the best."""
    metrics = evaluate(p, config) if p.eval is not None else {}
    metrics["train_loss"] = sum(losses) / max(1, len(losses))
    evals.append(metrics)
    if p.eval is not None and better(p.task, metrics, best["metrics"] if best else None):
        return {"epoch": epoch, "metrics": metrics, "params": {k: v.detach().cpu().clone() for k, v in params.items()}}
    return best


def decay_groups(model: AdaptedModel, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's groups as transformers' Trainer makes them: biases and norms without weight decay."""
    norms = set(model.norm_names())
    decay, no_decay = [], []
    for name, param in model.named_trainable_parameters():
        exempt = name in norms or name.endswith(("bias", "_b"))
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total` (transformers' linear schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


class _Deferred:
    """SIGINT held back while an optimizer step runs, so an interrupt never leaves it half applied."""

    def __init__(self) -> None:
        self.pending = False

    @contextmanager
    def hold(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = signal.signal(signal.SIGINT, lambda *_: setattr(self, "pending", True))
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


def state_path(output: str | Path) -> Path:
    return Path(f"{output}.state")


def _fingerprint(p: Prepared, config: TrainConfig) -> dict[str, Any]:
    """What a state file must match to be resumed: the model, the data, the settings."""
    return {
        "model": p.model.manifest.source.sha256,
        "model_file": p.model.path,
        "data": p.data.sha256,
        "eval": p.eval_data.sha256 if p.eval_data else None,
        "config": {k: v for k, v in asdict(config).items() if k not in ("device", "save_every")},
    }


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def train(
    p: Prepared,
    config: TrainConfig,
    output: str | Path | None,
    *,
    resume: bool = False,
    on_step: Callable[[Step], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `p.model` on `p.train` and save the best (or last) weights to `output` with a training record.

    With `output` None the model is trained in memory only: no state file, nothing saved (`p.model.save` later)."""
    output = check_output(output) if output is not None else None
    state_file = state_path(output) if output is not None else None
    if state_file is None:
        if resume:
            raise SurgeryError("--resume needs the output whose stopped run to continue")
    elif state_file.exists() and not resume:
        raise SurgeryError(
            f"{state_file}: the state of a stopped run for this output exists; continue it with --resume, "
            "or delete it to start over"
        )
    if resume and state_file is not None and not state_file.exists():
        raise SurgeryError(f"--resume: no state {state_file} (a stopped run's); run without --resume to start")
    model = p.model
    model.module.to(p.device)
    params = dict(model.named_trainable_parameters())
    n = len(p.train.examples)
    batches_per_epoch = math.ceil(n / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.accumulation)
    total = config.max_steps or config.epochs * steps_per_epoch
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(decay_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(int(config.warmup * total), total))
    fingerprint = _fingerprint(p, config)
    step, epoch, next_batch, seen = 0, 0, 0, 0
    losses: list[float] = []
    evals: list[dict[str, float]] = []
    best: dict[str, Any] | None = None
    rng = torch.get_rng_state()
    if resume and state_file is not None:
        state = torch.load(state_file, weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise SurgeryError(
                f"--resume: {state_file} was written by a run of other data, model or settings; give the same "
                "options as that run, or delete it to start over"
            )
        with torch.no_grad():
            for name, t in state["params"].items():
                params[name].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, next_batch, seen = state["step"], state["epoch"], state["next_batch"], state["seen"]
        losses, evals, best, rng = state["losses"], state["evals"], state["best"], state["rng"]
        torch.set_rng_state(rng)

    def snapshot() -> dict[str, Any]:
        return {
            "fingerprint": fingerprint,
            "params": {k: v.detach().cpu().clone() for k, v in params.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "epoch": epoch,
            "next_batch": next_batch,
            "seen": seen,
            "losses": losses,
            "evals": evals,
            "best": best,
            "rng": rng,
        }

    deferred = _Deferred()
    started, trained_s, resumed_at = time.perf_counter(), 0.0, seen  # speed: of this process's examples
    model.train(config.dropout)
    try:
        while epoch < config.epochs and step < total:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
            batches = [order[i : i + config.batch_size] for i in range(0, n, config.batch_size)]
            optimizer.zero_grad(set_to_none=True)
            tick = time.perf_counter()
            k = next_batch
            while k < len(batches) and step < total:
                group = batches[k : k + config.accumulation]
                rows = sum(len(b) for b in group)
                step_loss = 0.0
                for b in group:
                    inputs, labels = collate(p, [p.train.examples[i] for i in b.tolist()])
                    with _autocast(p, config):
                        logits = logits_of(model.module(**inputs))
                    loss = loss_of(p.task, logits, labels)
                    (loss * len(b) / rows).backward()
                    step_loss += float(loss.detach()) * len(b) / rows
                with deferred.hold():
                    if config.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, k, seen = step + 1, k + len(group), seen + rows
                    next_batch, rng = k, torch.get_rng_state()
                    losses.append(step_loss)
                now = time.perf_counter()
                trained_s += now - tick
                if on_step is not None:
                    on_step(
                        Step(step, total, epoch, step_loss, scheduler.get_last_lr()[0], seen / max(trained_s, 1e-9))
                    )
                if state_file is not None and config.save_every and step % config.save_every == 0:
                    _save_state(state_file, snapshot())
                tick = time.perf_counter()
            if k >= len(batches):  # a whole epoch: evaluate, keep the best
                best = _close_epoch(p, config, epoch, losses[-steps_per_epoch:], evals, best, params)
                if on_epoch is not None:
                    on_epoch(epoch, evals[-1])
                epoch, next_batch = epoch + 1, 0
                rng = torch.get_rng_state()
                if state_file is not None:
                    _save_state(state_file, snapshot())
    except KeyboardInterrupt:
        if state_file is None:
            raise
        _save_state(state_file, snapshot())
        interrupted = True
    else:
        interrupted = False
        if next_batch and step:  # stopped by max_steps within an epoch: evaluate where it stopped
            best = _close_epoch(p, config, epoch, losses[-steps_per_epoch:], evals, best, params)
        if best is not None:
            with torch.no_grad():
                for name, t in best["params"].items():
                    params[name].copy_(t)
    model.eval()
    rate = (seen - resumed_at) / max(trained_s, 1e-9)
    state = state_file if interrupted else None
    result = _result(p, config, output, interrupted, state, step, total, seen, losses, evals, best, started, rate)
    if interrupted:
        return result
    record = Training(
        task=p.task,
        data=p.data,
        steps=step,
        epochs=round(seen / max(1, len(p.train.examples)), 4),
        examples=seen,
        trainable=result.trainable,
        hyperparameters={**config.hyperparameters(), "max_length": p.max_length},
        metrics=result.metrics,
        eval_data=p.eval_data,
        labels=p.labels.names if p.labels else (),
        truncated=p.train.truncated + (p.eval.truncated if p.eval else 0),
    )
    if output is not None and state_file is not None:
        model.save(output, training=record)
        state_file.unlink(missing_ok=True)
    return result


def _result(
    p: Prepared,
    config: TrainConfig,
    output: Path | None,
    interrupted: bool,
    state: Path | None,
    step: int,
    total: int,
    seen: int,
    losses: list[float],
    evals: list[dict[str, float]],
    best: dict[str, Any] | None,
    started: float,
    examples_per_s: float,
) -> TrainResult:
    tail = losses[
        -max(1, min(len(losses), math.ceil(len(p.train.examples) / config.batch_size / config.accumulation))) :
    ]
    metrics = dict(best["metrics"]) if best else {}
    metrics.setdefault("train_loss", sum(tail) / max(1, len(tail)))
    metrics["final_step_loss"] = losses[-1] if losses else float("nan")
    return TrainResult(
        output=str(output) if output is not None else None,
        interrupted=interrupted,
        state=str(state) if state else None,
        steps=step,
        total_steps=total,
        epochs=round(seen / max(1, len(p.train.examples)), 4),
        examples=seen,
        trainable=p.model.trainable_count(),
        base=p.model.base_parameters,
        losses=losses,
        evals=evals,
        best_epoch=best["epoch"] if best else None,
        metrics=metrics,
        truncated=p.train.truncated + (p.eval.truncated if p.eval else 0),
        examples_per_s=examples_per_s,
        seconds=time.perf_counter() - started,
        labels=p.labels.names if p.labels else (),
    )


def run(
    model_path: str,
    data: str,
    output: str,
    *,
    eval_data: str | None = None,
    task: str | None = None,
    fields: dict[str, str | None] | None = None,
    config: TrainConfig | None = None,
    tokenizer: str | None = None,
    resume: bool = False,
    on_step: Callable[[Step], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Prepare and train: what `surgery train` does."""
    config = config or TrainConfig()
    check_output(output)
    p = prepare(model_path, data, eval_data, task, fields or {}, config, tokenizer)
    return train(p, config, output, resume=resume, on_step=on_step, on_epoch=on_epoch)
