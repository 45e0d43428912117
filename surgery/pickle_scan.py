"""Pickle streams scanned opcode by opcode, never unpickled: which globals would loading them call?

A pickle calls code by naming it (`GLOBAL`, `INST`, `STACK_GLOBAL`, the copyreg extension codes); `scan_pickles` walks
the opcodes (`pickletools.genops`) and refuses any global outside an allow-list, by default torch's own for
`torch.load(weights_only=True)`. The `.pt2` checks (`surgery/safe_files.py`) scan every member with it.
"""

from __future__ import annotations

import functools
import io
import pickletools
import re
import struct
from typing import IO, Any

SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

_STRING_OPS = frozenset(
    """
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE SHORT_BINUNICODE BINUNICODE8
    """.split()
)
_NEUTRAL_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


@functools.cache
def allowed_globals() -> frozenset[str]:
    """The globals `torch.load(weights_only=True)` accepts: tensors, storages, dtypes, OrderedDict, ..."""
    from torch import _weights_only_unpickler

    return frozenset(_weights_only_unpickler._get_allowed_globals())


def scan_pickles(data: bytes, allowed: frozenset[str] | None = None) -> str | None:
    """Scan `data` as a sequence of pickles, opcode by opcode, without unpickling it.

    Returns what the first forbidden opcode would do ("calls os.system"), or None when every global named is
    in `allowed` (default: torch's weights_only allow-list). Scanning stops where the bytes stop being a pickle:
    an unpickler stops there too, having called nothing but what was checked. `STACK_GLOBAL` takes its module
    and name from the two strings pushed just before it; anything else it could take is refused.
    """
    allowed = allowed_globals() if allowed is None else allowed
    stream = io.BytesIO(data)
    first = True
    while stream.tell() < len(data):
        try:
            found = _scan_one(stream, allowed, strict=first)
        except _NotAPickle:
            return None
        if found:
            return found
        first = False
    return None


class _NotAPickle(Exception):
    pass


def _scan_one(stream: IO[bytes], allowed: frozenset[str], strict: bool) -> str | None:
    stack: list[Any] = []  # strings where known, None where not
    memo: dict[Any, Any] = {}
    proto = 0
    try:
        for op, arg, _ in pickletools.genops(stream):
            kind = op.name
            if kind == "PROTO":
                proto = int(arg)
            if kind in _STRING_OPS:
                stack.append(arg if isinstance(arg, str) else None)
            elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1] if stack else None
            elif kind == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif kind in _GET_OPS:
                stack.append(memo.get(arg))
            elif kind in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                bad = _refused(module, attr, allowed, proto, strict)
                if bad:
                    return bad
                stack.append(None)
            elif kind == "STACK_GLOBAL":
                module, attr = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                if not isinstance(module, str) or not isinstance(attr, str):
                    return "builds the name of what it calls at load time"
                bad = _refused(module, attr, allowed, proto, strict)
                if bad:
                    return bad
                del stack[-2:]
                stack.append(None)
            elif kind in ("EXT1", "EXT2", "EXT4"):
                return "calls a function from the copyreg extension registry"
            elif kind == "STOP":
                return None
            elif kind not in _NEUTRAL_OPS:
                stack.append(None)
    except (ValueError, UnicodeDecodeError, struct.error, EOFError, MemoryError, OverflowError) as exc:
        raise _NotAPickle from exc
    raise _NotAPickle


def _refused(module: str, attr: str, allowed: frozenset[str], proto: int, strict: bool) -> str | None:
    full = f"{module}.{attr}"
    if full in allowed:
        return None
    if proto < 3 and module == "__builtin__" and f"builtins.{attr}" in allowed:  # torch.save's protocol 2 on Python 3
        return None
    if not strict and not (SYMBOL.match(module.replace(".", "_")) and SYMBOL.match(attr.replace(".", "_"))):
        raise _NotAPickle  # bytes after the first pickle that only look like one: no importable name
    return f"calls {full}"
