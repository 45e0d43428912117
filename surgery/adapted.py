"""An adapted model to train in any torch loop: `surgery.open("model.adapted.pt2")`.

`torch.export.load(p).module()` trains as it is, with three catches this module removes:

- it takes keyword arguments only (a positional call fails with `kwarg keyword mismatch`): `open` adds a forward
  pre-hook that names positional arguments by the manifest's signature, and fills a missing `attention_mask`
  with ones;
- its `train()` and `eval()` raise: the capture is an inference graph. Its dropout is still there, as
  `aten.dropout(x, p, False)` nodes holding the base config's probabilities (hidden and classifier dropout), and
  attention dropout is `scaled_dot_product_attention` with no `dropout_p`. `train()` flips those nodes' flag to
  True and gives each attention node the config's attention dropout (`attention_probs_dropout_prob`,
  `attention_dropout` or `attn_pdrop`, read from the source's config.json); `eval()` puts both back. The module
  exported by `save` is always the eval graph: no dropout in what is deployed;
- `torch.export.save` drops the manifest: `save` writes it back, with a training record if given.

The adapters are lifted to modules (`adapters.<site>`), so `trainable_parameters()` are ordinary parameters:
the adapters, a classification head, and the norms if asked for.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from surgery.adapters import StackSpec
from surgery.bundle import Manifest, Training, save_program
from surgery.errors import SurgeryError
from surgery.graph import lift_adapters
from surgery.signature import Signature
from surgery.sites import ADAPTER_ROOT
from surgery.tasks import SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION

DROPOUT = torch.ops.aten.dropout.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
SDPA_DROPOUT_ARG = 4  # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
HEAD_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION)  # tasks whose head is new, and trained


def source_config(manifest: Manifest) -> dict[str, Any]:
    """The base model's config.json (a folder's, or the config.json the source was), {} when there is none."""
    path = Path(manifest.source.path)
    path = path / "config.json" if path.is_dir() else path
    if path.name != "config.json" or not path.is_file():
        return {}
    from runtime.files import read_config

    return read_config(path, manifest.source.name)


def attention_dropout(config: dict[str, Any]) -> float:
    """The attention dropout a config sets (0 when it sets none)."""
    return next((float(config[k]) for k in ATTENTION_DROPOUT_KEYS if isinstance(config.get(k), (int, float))), 0.0)


def set_dropout(gm: fx.GraphModule, train: bool, attention_p: float = 0.0) -> int:
    """Switch the dropout of an exported graph on (`train`) or off, in place; returns the dropout nodes switched.

    Before (eval):  `dropout = aten.dropout(linear_3, 0.1, False)`; `sdpa = aten.scaled_dot_product_attention(q, k,
    v, mask, scale=s)`. After (train, attention_p 0.1): `aten.dropout(linear_3, 0.1, True)`;
    `aten.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1, scale=s)`.
    """
    count = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is DROPOUT:
            n.args = (n.args[0], n.args[1], train)
            count += 1
        elif n.target is SDPA:
            args, kwargs = list(n.args), dict(n.kwargs)
            p = attention_p if train else 0.0
            if len(args) > SDPA_DROPOUT_ARG:
                args[SDPA_DROPOUT_ARG] = p
            elif p:
                kwargs["dropout_p"] = p
            else:
                kwargs.pop("dropout_p", None)
            n.args, n.kwargs = tuple(args), kwargs
            count += bool(attention_p)
    gm.graph.lint()
    gm.recompile()
    return count


def _by_name(signature: Signature):  # noqa: ANN202  a forward pre-hook
    """A forward pre-hook (with kwargs) that takes inputs by position or by name and passes them as the graph wants
    (by name; a causal LM's cache layout by position). Left out: `attention_mask` is ones, a causal LM's
    `position_ids` follow the mask and its cache `past_key_values.N.*` is empty (no past positions)."""
    names = signature.names
    specs = {i.name: i for i in signature.inputs}

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if len(args) > len(names):
            raise SurgeryError(f"the model takes {len(names)} inputs ({', '.join(names)}); it was given {len(args)}")
        named = dict(zip(names, args))
        twice = named.keys() & kwargs.keys()
        if twice:
            raise SurgeryError(f"input {sorted(twice)[0]} given both by position and by name; give it once")
        named.update(kwargs)
        ids = named.get("input_ids")
        if isinstance(ids, torch.Tensor):
            if "attention_mask" in specs and "attention_mask" not in named:
                named["attention_mask"] = torch.ones_like(ids)
            if "position_ids" in specs and "position_ids" not in named and "attention_mask" in named:
                named["position_ids"] = (named["attention_mask"].cumsum(1) - 1).clamp(min=0)[:, -ids.shape[1] :]
            for name, spec in specs.items():
                if name.startswith("past_key_values.") and name not in named:  # (batch, kv_heads, 0, head_dim)
                    shape = (ids.shape[0], spec.shape[1], 0, *spec.shape[3:])
                    named[name] = torch.zeros(shape, dtype=spec.torch_dtype, device=ids.device)
        missing = [n for n in names if n not in named]
        if missing:
            raise SurgeryError(f"the model takes {', '.join(names)}; {', '.join(missing)} not given")
        unknown = [n for n in named if n not in specs]
        if unknown:
            raise SurgeryError(f"the model takes {', '.join(names)}; it has no input {unknown[0]}")
        if signature.positional:
            return tuple(named[n] for n in names), {}
        return (), named

    return hook


def _apply_with_constants(module: fx.GraphModule, fn: Any, recurse: bool = True) -> fx.GraphModule:
    """`nn.Module._apply` (what `.to`, `.cuda`, `.half` call), and the same for the tensor constants `torch.export`
    lifted into plain attributes (`lifted_tensor_0`: neither parameters nor buffers, so `.to` would leave them)."""
    nn.Module._apply(module, fn, recurse)
    known = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    for node in module.graph.nodes:
        if node.op == "get_attr" and node.target not in known:
            prefix, _, name = str(node.target).rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            value = getattr(owner, name, None)
            if isinstance(value, torch.Tensor):
                setattr(owner, name, fn(value))
    return module


class AdaptedModel:
    """An `.adapted.pt2` opened for training: `module` (an fx GraphModule to call and train), `manifest`,
    `trainable_parameters()`, `train()` / `eval()` (dropout on and off), and `save(path)`.

    Which parameters train: the adapters always; a classification head (sequence or token classification) unless
    `head=False`; the norms' weights and biases with `norms=True` (`set_trainable`).
    """

    def __init__(self, gm: fx.GraphModule, manifest: Manifest, path: str):
        self.module = gm
        self.manifest = manifest
        self.path = path
        self.config = source_config(manifest)
        self.attention_p = attention_dropout(self.config)
        self.dropout_nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is DROPOUT)
        gm.register_forward_pre_hook(_by_name(manifest.signature), prepend=True, with_kwargs=True)
        model = self

        def train(module: nn.Module, mode: bool = True) -> nn.Module:
            nn.Module.train(module, mode)
            set_dropout(module, mode, model.attention_p)
            return module

        def eval_(module: nn.Module) -> nn.Module:
            return train(module, False)

        gm.train = types.MethodType(train, gm)  # type: ignore[method-assign]  (torch's versions raise)
        gm.eval = types.MethodType(eval_, gm)  # type: ignore[method-assign]
        gm._apply = types.MethodType(_apply_with_constants, gm)  # type: ignore[method-assign]
        gm.eval()
        self.set_trainable()

    # which parameters train

    def head_names(self) -> list[str]:
        """The parameters of a classification head: the top-level submodules beside the base model (the largest
        one) and the adapters, e.g. BERT's `classifier.weight`, GPT-2's `score.weight`; none for other tasks."""
        if self.manifest.task not in HEAD_TASKS:
            return []
        sizes: dict[str, int] = {}
        for name, p in self.module.named_parameters():
            top = name.split(".", 1)[0]
            sizes[top] = sizes.get(top, 0) + p.numel()
        base = max((t for t in sizes if t != ADAPTER_ROOT), key=lambda t: sizes[t])
        return [n for n, _ in self.module.named_parameters() if n.split(".", 1)[0] not in (base, ADAPTER_ROOT)]

    def norm_names(self) -> list[str]:
        """The weights and biases of the norms (modules named *norm*, *ln*, as LayerNorm, ln_1, input_layernorm)."""
        names = []
        for name, _ in self.module.named_parameters():
            parts = name.split(".")
            owner = parts[-2].lower() if len(parts) > 1 else ""
            if not name.startswith(ADAPTER_ROOT + ".") and ("norm" in owner or owner.startswith("ln")):
                names.append(name)
        return names

    def set_trainable(self, head: bool = True, norms: bool = False) -> None:
        """Freeze the base; train the adapters, the head (`head`) and the norms (`norms`)."""
        chosen = set(self.head_names() if head else []) | set(self.norm_names() if norms else [])
        for name, p in self.module.named_parameters():
            p.requires_grad_(name.startswith(ADAPTER_ROOT + ".") or name in chosen)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters that train (`set_trainable`), for an optimizer."""
        return [p for _, p in self.named_trainable_parameters()]

    @property
    def base_parameters(self) -> int:
        """The parameters of the base model and its head, the adapters excluded."""
        return sum(p.numel() for n, p in self.module.named_parameters() if not n.startswith(ADAPTER_ROOT + "."))

    def head_classes(self) -> int | None:
        """The number of classes of a classification head (the rows of its weight), else None."""
        weights = [self.module.get_parameter(n) for n in self.head_names() if n.endswith("weight")]
        return int(weights[-1].shape[0]) if weights else None

    def new_head(self, classes: int, seed: int = 0) -> None:
        """Replace the classification head by one of `classes` outputs, initialised as transformers does:
        weight ~ normal(0, initializer_range), bias 0."""
        names = [n for n in self.head_names() if n.endswith(("weight", "bias"))]
        if not names:
            raise SurgeryError(f"{self.path}: a {self.manifest.task} model has no classification head to resize")
        std = float(self.config.get("initializer_range", 0.02))
        g = torch.Generator().manual_seed(seed)
        weight = [n for n in names if n.endswith("weight")][-1]
        prefix = weight.rsplit(".", 1)[0]
        owner = self.module.get_submodule(prefix)
        old = owner.weight
        w = torch.empty(classes, old.shape[1], dtype=old.dtype).normal_(0.0, std, generator=g)
        owner.weight = nn.Parameter(w.to(old.device))
        if isinstance(getattr(owner, "bias", None), torch.Tensor):
            owner.bias = nn.Parameter(torch.zeros(classes, dtype=old.dtype, device=old.device))
        self.set_trainable(head=True, norms=any(p.requires_grad for n, p in self._norms()))

    def _norms(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, self.module.get_parameter(n)) for n in self.norm_names()]

    # modes, device, saving

    def train(self, mode: bool = True) -> AdaptedModel:
        self.module.train(mode)
        return self

    def eval(self) -> AdaptedModel:
        return self.train(False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def save(self, path: str | Path, training: Training | None = None) -> Manifest:
        """Write an `.adapted.pt2` (the eval graph, on the CPU) whose manifest records `training`; atomic."""
        manifest = dataclasses.replace(
            self.manifest,
            total=sum(p.numel() for p in self.module.parameters()),
            training=training if training is not None else self.manifest.training,
        )
        was_training = self.module.training
        device = next(self.module.parameters()).device
        self.module.eval()
        try:
            self.module.to("cpu")
            with torch.no_grad():
                save_program(path, self.module, manifest)
        finally:
            self.module.to(device)
            self.module.train(was_training)
        self.manifest = manifest
        return manifest


def open_adapted_model(path: str | Path, trust: bool = False) -> AdaptedModel:
    """An `.adapted.pt2` written by this tool, opened for training (see `AdaptedModel`)."""
    from surgery.pipeline import open_model

    name = str(path)
    captured = open_model(name, trust=trust)
    m = captured.manifest
    if m is None:
        kind = "a .pt2 without a surgery manifest" if name.endswith(".pt2") else "a model without adapters"
        raise SurgeryError(
            f"{name} is {kind}: nothing to train; insert adapters first: surgery insert {name} -o model.adapted.pt2"
        )
    if m.merged is not None:
        raise SurgeryError(
            f"{name}: its adapters are merged into the base weights; train the adapted model before `surgery merge`"
        )
    if isinstance(m.adapter, StackSpec):
        raise SurgeryError(f"{name} is a stack of adapters; train each model of the stack, then stack them again")
    lift_adapters(captured.gm, m.adapter, list(m.sites))
    return AdaptedModel(captured.gm, m, name)


def open(path: str | Path, trust: bool = False) -> AdaptedModel:  # noqa: A001  surgery.open, as a user calls it
    """`surgery.open("model.adapted.pt2")`: the adapted model, ready for a torch training loop."""
    return open_adapted_model(path, trust=trust)


def describe(model: AdaptedModel) -> dict[str, Any]:
    """What trains, for a summary: counts and the share of the base."""
    trainable = model.trainable_count()
    base = model.base_parameters
    return {"trainable": trainable, "base": base, "share": trainable / base, "dropout_nodes": model.dropout_nodes}
