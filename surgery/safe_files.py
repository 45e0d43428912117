"""Files that come from elsewhere are data, never code: checks that run before a library parses them.

A `.pt2` from `torch.export.save` is a zip archive, and `torch.export.load` runs code from it in three ways:
it unpickles members (sample inputs, pickled weights and constants: `torch.load(weights_only=False)` or
`pickle.loads`), it evaluates the graph's symbolic shape expressions with `sympy.sympify` (Python `eval`) and
its guards with `exec`, and it calls whatever its graph nodes name (`torch.os.system` resolves as well as
`torch.ops.aten.add.Tensor`). `check_pt2` reads the archive first, without unpickling or evaluating anything:

- every member that is not a raw tensor payload is scanned as a stream of pickles (by content, whatever its name;
  a torch.save archive inside is opened and its `data.pkl` scanned): every global it names must be on torch's
  `weights_only=True` allow-list (tensors, storages, dtypes, OrderedDict, ...);
- every graph node targets a registered operator (`torch.ops.<namespace>.<op>`) or a symbolic-shape operator;
- every symbolic expression and guard is a plain arithmetic expression over sizes (checked with `ast`);
- no member is absurdly large for the file (a zip bomb) and no name appears twice.

With `trust` only the size checks run. The pickle scanner is `surgery/pickle_scan.py`. The other doors
(`check_safetensors`, `read_config`, `check_onnx_data`, `check_name`: packs, HF configs, ONNX external data, names
that become paths) are the runtime's, in `runtime/files.py`. Each refusal is a `SurgeryError` of one line that names
the member or field and the way out.
"""

from __future__ import annotations

import ast
import functools
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.pickle_scan import scan_pickles

# A zip archive may not unpack to more than this many times its own size (plus a floor for tiny files):
# torch.export.save stores members uncompressed, so a legitimate archive is about 1x.
ZIP_RATIO = 50
ZIP_FLOOR = 64 << 20
# Graph node targets that are not `torch.ops.*` operators: what torch's serializer writes for symbolic ints.
OPERATOR_NAMESPACES = ("aten", "prims", "higher_order", "surgery")
FORBIDDEN_OPS = ("from_file", "_from_file")  # aten ops that read files by name
STORAGE_RECORD = re.compile(r"^[^/]+/data/\d+$")  # raw storage bytes inside a torch.save archive
SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SIZE_SYMBOL = re.compile(r"^[a-z]{1,4}\d+$")  # torch's shape symbols: s0, u3, ps12, zuf0


def _how(trust_hint: bool = True) -> str:
    way = "re-save it with torch.export.save (or this tool) from a copy you trust"
    return way + (", or pass --trust if the file comes from a trusted source" if trust_hint else "")


# ---------------------------------------------------------------------------------------------------- archives


def check_zip(zf: zipfile.ZipFile, size: int, name: str) -> None:
    """Refuse duplicate member names and members that unpack far beyond the archive's size (a zip bomb)."""
    seen: set[str] = set()
    total = 0
    cap = ZIP_RATIO * size + ZIP_FLOOR
    for info in zf.infolist():
        if info.filename in seen:
            raise SurgeryError(f"{name}: member {info.filename} appears twice in the archive; {_how(False)}")
        seen.add(info.filename)
        total += info.file_size
        if info.file_size > cap or total > cap:
            raise SurgeryError(
                f"{name}: member {info.filename} unpacks to {info.file_size:,} bytes, absurd for a file of {size:,} "
                f"bytes (a zip bomb?); {_how(False)}"
            )


def check_pt2(path: str | Path, name: str, trust: bool = False) -> None:
    """Refuse a torch.export archive that would run code when `torch.export.load` opens it (see module doc)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SurgeryError(f"{name}: not a readable zip archive ({exc}); re-export it with torch.export.save") from exc
    with zf:
        check_zip(zf, path.stat().st_size, name)
        if trust:
            return
        raw = _raw_payloads(zf, name)
        for info in zf.infolist():
            record = info.filename.split("/", 1)[-1]
            if record in raw or info.is_dir():
                continue
            data = _read(zf, info, name)
            what = _pt2_member(data, record)
            if what:
                raise SurgeryError(f"{name}: member {info.filename} {what}: opening the file would run code; {_how()}")


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, NotImplementedError, OSError, RuntimeError) as exc:  # RuntimeError: encrypted
        raise SurgeryError(f"{name}: member {info.filename} cannot be read ({exc}); {_how(False)}") from exc


def _raw_payloads(zf: zipfile.ZipFile, name: str) -> set[str]:
    """Records torch reads as raw tensor bytes (never unpickles), from the archive's weights and constants configs."""
    raw: set[str] = set()
    unpickled: set[str] = set()
    for info in zf.infolist():
        record = info.filename.split("/", 1)[-1]
        m = re.fullmatch(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json", record)
        if not m:
            continue
        try:
            config = json.loads(_read(zf, info, name))["config"]
            entries = [(e["path_name"], bool(e.get("use_pickle"))) for e in config.values()]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise SurgeryError(
                f"{name}: member {info.filename} is not a readable payload config ({exc}); {_how(False)}"
            ) from exc
        folder = f"data/{m.group(1)}/"
        for path_name, pickled in entries:
            tensor = m.group(1) == "weights" or str(path_name).startswith("tensor_")
            (raw if tensor and not pickled else unpickled).add(folder + str(path_name))
    return raw - unpickled


def _pt2_member(data: bytes, record: str) -> str | None:
    """What is wrong with one member of a .pt2 (None: nothing): its pickles, or its program's code strings."""
    if data[:4] == b"PK\x03\x04":  # a torch.save archive (the sample inputs) inside the archive
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                check_zip(inner, len(data), record)
                for info in inner.infolist():
                    if STORAGE_RECORD.match(info.filename) or info.is_dir():
                        continue
                    found = scan_pickles(inner.read(info))
                    if found:
                        return f"(its {info.filename}) is a pickle that {found}"
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
            return f"is a damaged inner archive ({exc})"
        return None
    found_in_json = _program_json(data)  # whatever its name: torch reads its programs as JSON
    if found_in_json:
        return found_in_json
    found = scan_pickles(data)
    return f"is a pickle that {found}" if found else None


# ---------------------------------------------------------------------------------------------------- programs

# What the graph's symbolic expressions may call (sympy's srepr constructors and torch's sympy functions).
SYMPY_CALLS = frozenset(
    """
    Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge StrictLessThan StrictGreaterThan
    LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair true false oo floor ceiling sqrt
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
    FloatPow FloatTrueDiv IntTrueDiv TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat OpaqueUnaryFn_sqrt
    BitwiseFn_bitwise_and BitwiseFn_bitwise_or IsNonOverlappingAndDenseIndicator Identity One Zero NegativeOne
    Half
    """.split()
)
GUARD_METHODS = {"size", "stride", "storage_offset", "dim", "numel", "isnan", "isinf", "trunc", "floor", "ceil"}
GUARD_NAMES = {"L", "math", "inf", "True", "False", "None"}
GUARD_CALLS = {"min", "max"}  # builtins over sizes (a KV cache's past + seq: `min(16*a + 16*b, 32*a + 32*b) == ...`)
_EXPR_NODES = (
    ast.Expression,
    ast.Call,
    ast.Name,
    ast.Constant,
    ast.keyword,
    ast.BinOp,
    ast.UnaryOp,
    ast.BoolOp,
    ast.Compare,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.boolop,
    ast.cmpop,
    ast.Subscript,
    ast.Attribute,
    ast.Tuple,
)


def _plain_expression(text: str, guard: bool) -> bool:
    """True if `text` is arithmetic over sizes: calls only to sympy constructors (and, in a guard, `L['x'].size()`)."""
    if not isinstance(text, str) or len(text) > 100_000 or "__" in text:
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            return False
        if isinstance(node, ast.Name) and not (
            node.id in SYMPY_CALLS or SIZE_SYMBOL.match(node.id) or (guard and node.id in GUARD_NAMES | GUARD_CALLS)
        ):
            return False
        if isinstance(node, ast.Call) and not (
            (isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLS)
            or (guard and isinstance(node.func, ast.Name) and node.func.id in GUARD_CALLS)
            or (guard and isinstance(node.func, ast.Attribute) and node.func.attr in GUARD_METHODS)
        ):
            return False
        if isinstance(node, ast.Attribute) and not (guard and node.attr in GUARD_METHODS):
            return False
        if isinstance(node, ast.Subscript) and not guard:
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not SYMBOL.match(node.value):
            return False
    return True


def _walk(value: Any) -> Iterator[tuple[str, Any, Any]]:
    """Every (key, value, parent dict) of a decoded JSON document."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                yield k, v, item
                todo.append(v)
        elif isinstance(item, list):
            todo.extend(item)


def _program_json(data: bytes) -> str | None:
    """What in a serialized program would run code at load or call time: node targets, expressions, guards."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None  # not JSON: torch cannot read it either
    sym_ops = _sym_op_names()
    for key, value, parent in _walk(doc):
        if key == "target" and isinstance(value, str) and "inputs" in parent and not _operator_target(value, sym_ops):
            return f"has a graph node that calls {value}, which is not a registered operator"
        if key == "expr_str" and not _plain_expression(value, guard=False):
            return f"has a shape expression that is not arithmetic ({str(value)[:60]!r})"
        if key == "guards_code" and isinstance(value, list):
            for g in value:
                if not _plain_expression(g, guard=True):
                    return f"has a guard that is not a size comparison ({str(g)[:60]!r})"
        if key == "range_constraints" and isinstance(value, dict):
            for k in value:
                if not _plain_expression(k, guard=False):
                    return f"has a range constraint on {str(k)[:60]!r}, which is not a symbol"
    return None


@functools.cache
def _sym_op_names() -> frozenset[str]:
    from torch._export.serde import serialize

    return frozenset(f"{t.__module__}.{t.__name__}" for t in serialize._SYM_OPS)


def _operator_target(target: str, sym_ops: frozenset[str]) -> bool:
    if target in sym_ops:
        return True
    parts = target.split(".")
    return (
        len(parts) in (4, 5)
        and parts[:2] == ["torch", "ops"]
        and parts[2] in OPERATOR_NAMESPACES
        and all(SYMBOL.match(p) for p in parts[3:])
        and parts[3] not in FORBIDDEN_OPS
        and not any(p.startswith("__") and not p.endswith("__") for p in parts[3:])
        and not any(p in ("__class__", "__init__", "__globals__", "__dict__", "__module__") for p in parts[3:])
    )
