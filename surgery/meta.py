"""Capture without weights: a Hugging Face folder's model built with its parameters on the `meta` device, made fake
tensors on the CPU (`FakeTensorMode`: shapes, dtypes and device, no data), captured by `torch.export` as usual; and
the checkpoint's safetensors shards, read tensor by tensor.

Fake CPU tensors rather than `meta` ones: torch.export then traces what it traces on real CPU weights (on `meta`,
attention's output strides differ and a `contiguous` appears in the graph).

The graph, the sites and the adapters are those of the eager capture (adapters are small: real tensors); what
is missing is the base weights, which `exporters/stream.py` copies from the shards into the ONNX external-data
file one at a time, and `exporters/blockwise.py` loads one transformer block at a time. Buffers (rotary
frequencies ...) are computed for real: they are small and the checkpoint does not hold them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from surgery.capture import Captured, export_program
from surgery.errors import SurgeryError
from surgery.source import Source
from surgery.weight_files import INDEX, SAFETENSORS_DTYPES, SINGLE


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lands on the `meta` device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def fake_parameters(model: nn.Module) -> None:
    """Every parameter of `model` (on `meta`) becomes a fake CPU tensor of its shape and dtype (in place)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # the real inputs and buffers meet fake weights
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                with mode:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device="cpu")
                module._parameters[name] = nn.Parameter(fake, requires_grad=False)


def is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


@dataclass(frozen=True)
class Checkpoint:
    """A folder's safetensors weights: which shard holds each tensor, and the model's name prefix (`model.`)."""

    folder: Path
    shards: dict[str, str]  # tensor name -> shard file name
    prefix: str = ""  # the base model's attribute in a task model (HF `base_model_prefix`)

    @classmethod
    def of(cls, folder: str | Path, prefix: str = "") -> Checkpoint:
        from safetensors import safe_open

        folder = Path(folder)
        if (folder / INDEX).is_file():
            index = json.loads((folder / INDEX).read_text())
            return cls(folder, dict(index["weight_map"]), prefix)
        if (folder / SINGLE).is_file():
            with safe_open(str(folder / SINGLE), "pt") as f:
                return cls(folder, {k: SINGLE for k in f.keys()}, prefix)
        raise SurgeryError(
            f"{folder}: no safetensors weights ({SINGLE} or {INDEX}); the streamed path reads safetensors only: "
            "convert the checkpoint (transformers: save_pretrained(..., safe_serialization=True)) or drop --stream"
        )

    def key(self, names: list[str]) -> str | None:
        """The checkpoint's name of a parameter known by any of `names` (tied parameters have several), trying each
        with and without the prefix."""
        p = self.prefix + "." if self.prefix else ""
        for name in names:
            for k in (name, p + name, name.removeprefix(p)):
                if k in self.shards:
                    return k
        return None

    def bytes(self) -> int:
        return sum((self.folder / s).stat().st_size for s in set(self.shards.values()))

    def read(self, keys: dict[str, torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each of `keys` in its dtype, one at a time, shard by shard. Read with plain reads at the offsets the
        shard's header gives, not mapped: a mapped shard's pages would count in the process's memory until it
        is closed, and published shards run to 10 GB."""
        by_shard: dict[str, list[str]] = {}
        for k in keys:
            by_shard.setdefault(self.shards[k], []).append(k)
        for shard, names in by_shard.items():
            with open(self.folder / shard, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
                for k in names:
                    yield k, read_tensor(f, size, header[k]).to(keys[k]).contiguous()


def read_tensor(f: Any, size: int, entry: dict[str, Any]) -> torch.Tensor:
    """One tensor of an open safetensors file (`size`: its header's length; `entry`: the header's record), read with a
    plain read at its offsets, in its own dtype (not mapped: the pages go once the tensor does)."""
    start, end = entry["data_offsets"]
    f.seek(8 + size + start)
    raw = bytearray(end - start)
    f.readinto(raw)
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    return (
        torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]) if raw else torch.empty(entry["shape"], dtype=dtype)
    )


@dataclass
class MetaCaptured(Captured):
    """A capture whose base parameters are fake tensors: `keys` maps each to its checkpoint tensor."""

    checkpoint: Checkpoint | None = None
    keys: dict[str, str] | None = None  # GraphModule parameter name (each name of a tied one) -> checkpoint tensor
    dtype: torch.dtype = torch.float32


def _tuple_outputs(gm: fx.GraphModule, n: int) -> None:
    """The GraphModule returns a plain tuple of its `n` leaves (as an eager capture with return_dict=False does)."""
    spec = pytree.tree_structure(tuple(range(n)))
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=spec)  # type: ignore[attr-defined]
    gm._out_spec = spec
    gm.recompile()


def capture_meta(source: str, dtype: str = "auto", task: str | None = None) -> MetaCaptured:
    """A Hugging Face folder captured with fake parameters: the eager capture's graph and sites at the
    cost of the buffers alone. `dtype` as `load` takes it (auto: the config's)."""
    from transformers import AutoConfig

    from surgery.load import DTYPE_NAMES, DTYPES, _decoder_inputs_from_input_ids, _model_class, _read_config
    from surgery.load import exportable_experts, hf_signature, sha256_of, takes_decoder_inputs
    from surgery.tasks import CAUSAL_LM, check_task, default_task, with_past

    path = Path(source)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))):
        raise SurgeryError(
            f"{source}: --stream reads safetensors, not GGUF; convert it first: surgery convert FILE.gguf FOLDER, "
            "then export FOLDER --stream (or drop --stream to load the GGUF in memory)"
        )
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise SurgeryError(
            f"{source}: --stream takes a Hugging Face folder (config.json and safetensors weights); "
            "give the folder, or drop --stream"
        )
    if dtype != "auto" and dtype not in DTYPES:
        raise SurgeryError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    check_task(task)
    config = _read_config(path / "config.json", source, AutoConfig)
    task = task or default_task(config)
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    wanted = DTYPES.get(dtype) or (own if own in DTYPE_NAMES else torch.float32)
    cls = _model_class(config, task)
    with params_on_meta():
        model = cls.from_config(config, dtype=wanted) if hasattr(cls, "from_config") else cls(config)
    model.eval()
    if hasattr(model.config, "use_cache") and task != CAUSAL_LM:
        model.config.use_cache = False
    exportable_experts(model)
    if takes_decoder_inputs(model) and task != CAUSAL_LM:
        model.register_forward_pre_hook(_decoder_inputs_from_input_ids, with_kwargs=True)
    checkpoint = Checkpoint.of(path, getattr(model, "base_model_prefix", "") or "")
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    keys, missing = {}, []
    for name, p in model.named_parameters():
        key = checkpoint.key(aliases[id(p)])
        if key is None:
            missing.append(name)
        else:
            keys.update({alias: key for alias in aliases[id(p)]})  # tied: the exporter may name either
    if missing:
        raise SurgeryError(
            f"{source}: {len(missing)} parameters are not in the checkpoint's safetensors (first: {missing[0]}); "
            "the folder's weights do not match its config.json: fix the folder, or drop --stream"
        )
    fake_parameters(model)
    if task == CAUSAL_LM:  # with its KV cache, as load does (tasks.py): the wrapper's outputs are named already
        module, signature = with_past(model)
        program = export_program(module, signature, source)
        gm = program.module()
    else:
        signature = hf_signature(model)
        program = export_program(model, signature, source)  # return_dict as configured: the output names
        out_spec = program.call_spec.out_spec
        names = tuple(str(k) for k in (out_spec.context or [])) if out_spec is not None else ()
        gm = program.module()
        leaves = len([n for n in gm.graph.output_node().args[0]]) if gm.graph.output_node().args else 0
        _tuple_outputs(gm, leaves)
        signature = replace(signature, outputs=names if len(names) == leaves else ())
    return MetaCaptured(
        gm=gm,
        signature=signature,
        source=Source(source, str(path), sha256_of(path), config.model_type),
        task=task,
        checkpoint=checkpoint,
        keys=keys,
        dtype=wanted,
    )


def block_of(path: str) -> int | None:
    """The transformer block a module path lies in: its first integer component (`layers.3.mlp` -> 3,
    `encoder.layer.0.attention` -> 0, `adapters.h.2.attn` -> 2); None outside the blocks."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m.group(1)) if m else None
