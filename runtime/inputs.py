"""What an exported ONNX model takes, read from the graph, and inputs checked against it before ONNX Runtime runs.

ONNX Runtime answers a wrong input with a long `InvalidArgument`/`Fail` traceback, or, for a token id past the
vocabulary, an index error from deep inside a Gather. Here each case is one `SurgeryError` that names the input,
what it got and what the model takes: names, rank, dtype, sizes of fixed axes and of axes shared between inputs
(batch, seq), and token ids inside the vocabulary (the rows of the embedding table `input_ids` indexes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SurgeryError

ADAPTER_PREFIX = "adapters."  # the overridable initializers of a swappable export: fed by packs, not by the user
TOKEN_IDS = "input_ids"
# ONNX Runtime's type strings for the numpy dtypes they take
ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}  # fmt: skip
# ops that pass token ids through unchanged on their way to the embedding's Gather
PASS_THROUGH = {"Cast", "Identity", "Reshape", "Flatten", "Unsqueeze", "Squeeze"}


@dataclass(frozen=True)
class GraphInput:
    """One input the user feeds: name, numpy dtype (None where ORT's type has no numpy twin) and dims (int where
    fixed, the axis name where symbolic, None where unnamed)."""

    name: str
    dtype: Any
    dims: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.name} ({np.dtype(self.dtype).name if self.dtype is not None else '?'}, [{dims}])"


def graph_inputs(session: Any) -> list[GraphInput]:
    """The inputs of an ONNX Runtime session that a caller feeds (adapter slots left out)."""
    found = []
    for i in session.get_inputs():
        if i.name.startswith(ADAPTER_PREFIX):
            continue
        dims = tuple(d if isinstance(d, int) or d is None else str(d) for d in i.shape)
        found.append(GraphInput(i.name, ORT_DTYPES.get(i.type), dims))
    return found


def vocab_size(path: str | Path) -> int | None:
    """Rows of the embedding table that `input_ids` indexes (the initializer a Gather reads at `input_ids`,
    through casts and reshapes), or None where the graph has no such table. Weights are not loaded."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    tables = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:  # tables folded into Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier, seen = [TOKEN_IDS], set()
    while frontier:
        tensor = frontier.pop()
        seen.add(tensor)
        for node in consumers.get(tensor, []):
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                dims = tables.get(node.input[0])
                if dims and len(dims) == 2:
                    return int(dims[0])
            elif node.op_type in PASS_THROUGH and node.input[0] == tensor:
                frontier.extend(o for o in node.output if o not in seen)
    return None


def check_feeds(feeds: dict[str, np.ndarray], inputs: list[GraphInput], vocab: int | None, what: str) -> None:
    """Refuse, with one line each, inputs that ONNX Runtime would fail on: unknown or missing names, another rank,
    dtype or size of a fixed axis, axes of one name that disagree across inputs, token ids outside 0..vocab-1."""
    takes = ", ".join(i.describe() for i in inputs)
    known = {i.name for i in inputs}
    extra = [n for n in feeds if n not in known and not n.startswith(ADAPTER_PREFIX)]
    if extra:
        raise SurgeryError(f"{what}: {extra[0]!r} is not an input of this model; it takes {takes}")
    missing = [i.name for i in inputs if i.name not in feeds]
    if "attention_mask" in missing:
        raise SurgeryError(
            f"{what}: no attention_mask; this model takes {takes}. Give one array per input "
            "(attention_mask: 1 for real tokens, 0 for padding, shaped like input_ids)"
        )
    if missing:
        raise SurgeryError(f"{what}: no {missing[0]!r}; this model takes {takes}")
    sizes: dict[str, tuple[int, str]] = {}  # symbolic axis -> (size, the input that set it)
    for spec in inputs:
        array = feeds[spec.name]
        if array.ndim != len(spec.dims):
            raise SurgeryError(
                f"{what}: {spec.name} has {array.ndim} dimensions {list(array.shape)}; "
                f"the model takes {len(spec.dims)}: {spec.describe()}"
            )
        if spec.dtype is not None and array.dtype != np.dtype(spec.dtype):
            raise SurgeryError(
                f"{what}: {spec.name} is {array.dtype}; the model takes {np.dtype(spec.dtype).name} "
                f"(convert it, e.g. array.astype(np.{np.dtype(spec.dtype).name}))"
            )
        for k, (dim, size) in enumerate(zip(spec.dims, array.shape)):
            if isinstance(dim, int) and dim != size:
                raise SurgeryError(f"{what}: {spec.name} has size {size} on axis {k}; the model takes {dim} there")
            if isinstance(dim, str):
                seen = sizes.setdefault(dim, (size, spec.name))
                if seen[0] != size:
                    raise SurgeryError(
                        f"{what}: {spec.name} has {dim} = {size} (axis {k}) but {seen[1]} has {dim} = {seen[0]}; "
                        "inputs must agree on every shared axis"
                    )
    ids = feeds.get(TOKEN_IDS)
    if vocab is not None and ids is not None and ids.size and np.issubdtype(ids.dtype, np.integer):
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise SurgeryError(f"{what}: {TOKEN_IDS} holds token id {bad}; this model's vocabulary is 0..{vocab - 1}")


# A causal LM exported with its KV cache (surgery/tasks.py): inputs input_ids, attention_mask (batch, past + seq),
# position_ids (batch, seq) and past_key_values.N.key/.value (batch, kv_heads, past, head_dim), N = 0..layers-1.
CACHE_PREFIX = "past_key_values."
MAX_POSITIONS = "surgery.max_positions"  # the export's metadata


@dataclass(frozen=True)
class CacheLayout:
    """What a cache graph's past tensors look like, read from its inputs: layers, KV heads, head size, dtype, and
    the model's positions (its metadata)."""

    layers: int
    kv_heads: int | str | None
    head_dim: int | str | None
    dtype: Any
    max_positions: int | None

    @classmethod
    def of(cls, inputs: list[GraphInput], meta: dict[str, str] | None = None) -> CacheLayout | None:
        """The layout of a graph in the KV-cache form, else None."""
        past = [i for i in inputs if i.name.startswith(CACHE_PREFIX)]
        if not past or "position_ids" not in {i.name for i in inputs}:
            return None
        first = past[0]
        positions = (meta or {}).get(MAX_POSITIONS)
        layers = len({i.name.split(".")[1] for i in past})
        return cls(layers, first.dims[1], first.dims[3], first.dtype, int(positions) if positions else None)

    @property
    def names(self) -> list[str]:
        return [f"{CACHE_PREFIX}{n}.{kind}" for n in range(self.layers) for kind in ("key", "value")]

    def describe(self) -> str:
        dtype = np.dtype(self.dtype).name if self.dtype is not None else "?"
        return (
            f"{CACHE_PREFIX}N.key/.value for N in 0..{self.layers - 1}, each {dtype} "
            f"(batch, {self.kv_heads} KV heads, past, {self.head_dim} per head)"
        )


def check_cache_feeds(feeds: dict[str, np.ndarray], cache: CacheLayout, what: str) -> None:
    """Refuse, one line each, what a cache graph would fail on or compute wrongly: a missing or misshapen past
    tensor, layers whose past lengths or batches disagree, an attention_mask not over past + seq positions,
    position_ids not shaped like input_ids or past the model's positions, past + seq beyond them."""
    missing = [n for n in cache.names if n not in feeds]
    if missing:
        raise SurgeryError(
            f"{what}: no {missing[0]}; this model takes its KV cache as {cache.describe()}; "
            "for a prompt with no cache yet give them with past 0"
        )
    past_len = batch = None
    for name in cache.names:
        a = feeds[name]
        if a.ndim != 4 or any(
            isinstance(want, int) and a.shape[k] != want for k, want in ((1, cache.kv_heads), (3, cache.head_dim))
        ):
            raise SurgeryError(f"{what}: {name} is shaped {list(a.shape)}; this model's cache is {cache.describe()}")
        if cache.dtype is not None and a.dtype != np.dtype(cache.dtype):
            raise SurgeryError(f"{what}: {name} is {a.dtype}; this model's cache is {cache.describe()}")
        if past_len is None:
            past_len, batch, first = a.shape[2], a.shape[0], name
        elif (a.shape[0], a.shape[2]) != (batch, past_len):
            raise SurgeryError(
                f"{what}: {name} holds {a.shape[0]} rows of {a.shape[2]} past positions, {first} {batch} of "
                f"{past_len}; every layer's cache has the same batch and past length"
            )
    ids, mask, positions = (feeds.get(n) for n in (TOKEN_IDS, "attention_mask", "position_ids"))
    if ids is None or ids.ndim != 2 or mask is None or mask.ndim != 2 or positions is None:
        return  # check_feeds names what is missing or misshapen there
    seq = ids.shape[1]
    if mask.shape[1] != past_len + seq:
        raise SurgeryError(
            f"{what}: attention_mask covers {mask.shape[1]} positions; with {past_len} past and {seq} new tokens "
            f"it covers {past_len + seq} (the past's, then the new tokens')"
        )
    if positions.shape != ids.shape:
        raise SurgeryError(
            f"{what}: position_ids is shaped {list(positions.shape)}; it gives each new token its position, "
            f"shaped like input_ids {list(ids.shape)}"
        )
    top = cache.max_positions
    if top is not None and past_len + seq > top:
        raise SurgeryError(
            f"{what}: {past_len} past + {seq} new tokens = {past_len + seq} positions; the model has {top}"
        )
    if top is not None and positions.size and (positions.min() < 0 or positions.max() >= top):
        bad = int(positions.min() if positions.min() < 0 else positions.max())
        raise SurgeryError(f"{what}: position_ids holds {bad}; this model's positions are 0..{top - 1}")
