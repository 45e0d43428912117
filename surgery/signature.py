"""What a model takes: named inputs, their example sizes, dtypes and dynamic axes.

A `Signature` is the one description of a model's inputs that every stage shares: capture turns it into
`torch.export` dynamic shapes, the bundle stores it in the manifest, and the exporters build test batches
from it (of other shapes than the captured ones, with padding where there is an attention mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from surgery.errors import SurgeryError

BATCH = "batch"
DEFAULT_SIZES = {BATCH: 2}  # example size of a dynamic axis at capture; other names default to 16
OTHER_DEFAULT = 16


@dataclass(frozen=True)
class Axis:
    """A dynamic dimension: its name (shared across inputs) and its inclusive range."""

    name: str
    min: int
    max: int
    sum_of: tuple[str, ...] = ()  # a derived axis: the sum of these axes (a KV cache's total = past + seq)
    # an axis whose guards torch.export's solver cannot prove over the range (a convolution stack's floor divisions
    # on raw audio): given as `Dim.DYNAMIC` with its range, which still refuses a specialised size; one input only
    unproven: bool = False


@dataclass(frozen=True)
class InputSpec:
    """One input tensor: example shape used at capture, dtype, dynamic axes and, for integers, a value bound."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the prefix: "int64", "float32"
    axes: dict[int, Axis] = field(default_factory=dict)
    high: int | None = None  # exclusive upper bound of integer values (token ids: the vocabulary size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def sizes(self, overrides: dict[str, int] | None = None) -> tuple[int, ...]:
        """The shape with each dynamic axis taken from `overrides` (by axis name) when given."""
        overrides = overrides or {}
        return tuple(overrides.get(self.axes[i].name, s) if i in self.axes else s for i, s in enumerate(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "axes": {str(i): _axis_json(a) for i, a in self.axes.items()},
            "high": self.high,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        axes = {
            int(i): Axis(a[0], a[1], a[2], tuple(a[3]) if len(a) > 3 else (), bool(a[4]) if len(a) > 4 else False)
            for i, a in d["axes"].items()
        }
        return cls(d["name"], tuple(d["shape"]), d["dtype"], axes, d.get("high"))


def _axis_json(a: Axis) -> list[Any]:
    """[name, min, max], then [sum_of] where derived, then `unproven` where set (the form earlier versions read)."""
    tail = [list(a.sum_of), True] if a.unproven else [list(a.sum_of)] if a.sum_of else []
    return [a.name, a.min, a.max, *tail]


@dataclass(frozen=True)
class Signature:
    """All inputs of a model, and whether it is called positionally or by keyword."""

    inputs: tuple[InputSpec, ...]
    positional: bool = False
    outputs: tuple[str, ...] = ()  # names of the output leaves, when known (HF models: the ModelOutput keys)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    def axes(self) -> dict[str, Axis]:
        """Every dynamic axis by name (an axis shared by several inputs appears once)."""
        return {a.name: a for i in self.inputs for a in i.axes.values()}

    def dynamic_shapes(self) -> dict[str, Any] | tuple[Any, ...]:
        """`torch.export` dynamic shapes; an axis name shared by several inputs becomes one `Dim`. A derived axis
        (`sum_of`) is `Dim.AUTO`: torch.export finds the sum itself (a `Dim` cannot be the sum of two others); an
        `unproven` axis is `Dim.DYNAMIC` with its range."""
        Dim = torch.export.Dim
        dims = {
            a.name: Dim.AUTO
            if a.sum_of
            else Dim.DYNAMIC(min=a.min, max=a.max)
            if a.unproven
            else Dim(a.name, min=a.min, max=a.max)
            for a in self.axes().values()
        }
        per_input = [{i: dims[a.name] for i, a in spec.axes.items()} or None for spec in self.inputs]
        if self.positional:
            return tuple(per_input)
        return dict(zip(self.names, per_input))

    def examples(self, sizes: dict[str, int] | None = None, seed: int = 0, pad: bool = False) -> list[torch.Tensor]:
        """Example tensors at the capture shape, or at `sizes` (axis name -> size).

        With `pad`, an `attention_mask` gets trailing zeros on every row but the first (row i keeps
        about 1 - i/(2B) of its positions), the padded batch a server sends; a KV cache's mask (over past + seq)
        is padded on the left and within the past only (row i loses i/B of it), as a generation loop pads its
        prompts: every new token is a real one (what a model computes at a padded query is unspecified, and its
        garbage would sit in the present tensors, which no mask covers). `position_ids` beside an attention
        mask are the positions it implies (of the last `seq` of its columns), as a generation loop feeds them:
        random positions up to a large maximum (8192) turn rotary angles into fp32 rounding noise.
        """
        g = torch.Generator().manual_seed(seed)
        sizes = self.resolve(sizes)
        tensors = []
        for spec in self.inputs:
            shape = spec.sizes(sizes)
            dtype = spec.torch_dtype
            if spec.name == "attention_mask":
                t = torch.ones(shape, dtype=dtype)
                past = sizes.get("past", 0) if sizes and any(a.sum_of for a in spec.axes.values()) else None
                if pad and len(shape) == 2 and past is not None:  # a KV cache's: padded on the left, in the past
                    for row in range(1, shape[0]):
                        t[row, : (row * past) // shape[0]] = 0
                elif pad and len(shape) == 2:
                    b, s = shape
                    for row in range(1, b):
                        keep = max(1, s - (row * s) // (2 * b))
                        t[row, keep:] = 0
            elif dtype.is_floating_point:
                t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
            elif dtype == torch.bool:
                t = torch.ones(shape, dtype=dtype)
            else:
                t = torch.randint(0, spec.high or 2, shape, generator=g, dtype=dtype)
            tensors.append(t)
        names = self.names
        if "position_ids" in names and "attention_mask" in names:  # a causal LM's: where each token sits
            mask, i = tensors[names.index("attention_mask")], names.index("position_ids")
            seq = tensors[i].shape[-1]
            tensors[i] = (mask.cumsum(-1) - 1).clamp(min=0)[:, mask.shape[-1] - seq :].to(tensors[i].dtype).contiguous()
        return tensors

    def resolve(self, sizes: dict[str, int] | None) -> dict[str, int] | None:
        """`sizes` with every derived axis (`sum_of`) set to the sum of its parts, each part from `sizes` or
        the captured example; unchanged where no axis is derived."""
        derived = [a for a in self.axes().values() if a.sum_of]
        if not derived:
            return sizes
        example = {a.name: spec.shape[i] for spec in self.inputs for i, a in spec.axes.items()}
        full = {**example, **(sizes or {})}
        return {**full, **{a.name: sum(full[p] for p in a.sum_of) for a in derived}}

    def call(self, module: Any, tensors: list[torch.Tensor]) -> Any:
        if self.positional:
            return module(*tensors)
        return module(**dict(zip(self.names, tensors)))

    def export_args(self, tensors: list[torch.Tensor]) -> tuple[tuple, dict]:
        """(args, kwargs) in the form `torch.export.export` and `torch.onnx.export` take them."""
        if self.positional:
            return tuple(tensors), {}
        return (), dict(zip(self.names, tensors))

    def to_json(self) -> dict[str, Any]:
        return {
            "positional": self.positional,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Signature:
        return cls(tuple(InputSpec.from_json(i) for i in d["inputs"]), d["positional"], tuple(d.get("outputs", ())))


def parse_input_shape(text: str, name: str, dtype: str = "float32") -> InputSpec:
    """`--input-shape batch,seq,64`: integers are static sizes, names are dynamic axes.

    `batch` ranges over 1..64 (example 2); any other name over 2..4096 (example 16). `name=lo:hi`
    sets the range of a named axis, e.g. `batch,tokens=2:1024,64`.
    """
    shape: list[int] = []
    axes: dict[int, Axis] = {}
    for i, tok in enumerate(t.strip() for t in text.split(",")):
        if tok.isdigit() and int(tok) > 0:
            shape.append(int(tok))
            continue
        axis_name, _, rng = tok.partition("=")
        if not axis_name.isidentifier():
            raise SurgeryError(
                f"--input-shape {text!r}: {tok!r} is neither a positive size nor an axis name; "
                "write sizes and names separated by commas, e.g. batch,seq,64"
            )
        lo, hi = (1, 64) if axis_name == BATCH else (2, 4096)
        if rng:
            try:
                lo, hi = (int(x) for x in rng.split(":"))
            except ValueError as exc:
                raise SurgeryError(f"--input-shape {text!r}: range {rng!r} must be MIN:MAX, e.g. seq=2:512") from exc
        example = min(max(DEFAULT_SIZES.get(axis_name, OTHER_DEFAULT), lo), hi)
        shape.append(example)
        axes[i] = Axis(axis_name, lo, hi)
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise SurgeryError(f"--input-dtype {dtype!r} is not a torch dtype; use e.g. float32, float16, int64")
    is_float = getattr(torch, dtype).is_floating_point
    return InputSpec(name, tuple(shape), dtype, axes, high=None if is_float else 2)
