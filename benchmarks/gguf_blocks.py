"""How exactly a GGUF file's blocks map onto MatMulNBits, per block type, against gguf's own dequantization (the one
transformers loads).

    python -m benchmarks.gguf_blocks smollm2-135m tests-tiny -o benchmarks/results/gguf_blocks.json

Each argument is a real checkpoint name of surgery/zoo.py, a .gguf path, or `tests-tiny` (the small Llama GGUF of
tests/checkpoints.py: Q8_0, Q4_0 and F16 matrices). Per block type, over every 2-D tensor of it:
- Q4_0 and Q8_0: the blocks as exporters/gguf_carry.py writes them (scale d, default zero point 8 or 128),
  dequantized as MatMulNBits computes them, against gguf's values: max |diff| (expected 0).
- Q4_1 (value d·q + m): MatMulNBits with a float zero point zp = −m/d (fp32 and fp16 zero points), (q − zp)·d against
  d·q + m: max |diff|, its ratio to the tensor's max |w|, and the blocks with d = 0 and m ≠ 0, which no zero point
  expresses (their value is m, the scale 0).
- other types (K-quants, F16): counted only; an export requantizes their dequantized values.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.args import add_output
from benchmarks.timing import machine


def _q4_1(raw: np.ndarray, shape: tuple[int, int]) -> dict[str, Any]:
    """Q4_1 rows (rows, bytes): the float-zero-point form's distance from d·q + m."""
    rows = raw.shape[0]
    per = raw.reshape(rows, -1, 20)  # 2 bytes d, 2 bytes m, 16 bytes of 32 nibbles
    d = per[..., 0:2].copy().view(np.float16).astype(np.float32)  # (rows, blocks, 1)
    m = per[..., 2:4].copy().view(np.float16).astype(np.float32)
    body = per[..., 4:]
    q = np.concatenate([body & 0x0F, body >> 4], axis=-1).astype(np.float32)  # (rows, blocks, 32)
    exact = d * q + m
    out: dict[str, Any] = {"max_abs_w": float(np.abs(exact).max())}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, dtype in (("fp32", np.float32), ("fp16", np.float16)):
            zp = (-m / d).astype(dtype).astype(np.float32)
            got = (q - zp) * d
            ok = d != 0
            diff = np.abs(np.where(ok, got - exact, 0.0))
            out[f"zero_point_{name}_max_abs_diff"] = float(diff.max())
            out[f"zero_point_{name}_of_max_w"] = float(diff.max() / out["max_abs_w"])
    unexpressible = (d == 0) & (m != 0)
    out["blocks"] = int(d.size)
    out["blocks_d0_m_nonzero"] = int(unexpressible.sum())
    out["max_abs_m_where_d0"] = float(np.abs(np.where(unexpressible, m, 0)).max())
    return out


def measure(path: Path) -> dict[str, Any]:
    import gguf

    from exporters.gguf_carry import _blocks
    from exporters.quantize import dequantize_blocks

    reader = gguf.GGUFReader(str(path))
    per_type: dict[str, dict[str, Any]] = {}
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        kind = t.tensor_type.name
        entry = per_type.setdefault(kind, {"tensors": 0})
        entry["tensors"] += 1
        raw = np.asarray(t.data)
        if kind in ("Q4_0", "Q8_0"):
            bits = 4 if kind == "Q4_0" else 8
            want = gguf.quants.dequantize(raw, t.tensor_type)  # (rows, K)
            q, scales = _blocks(raw, bits, want.shape[1], np.dtype(np.float32))
            attrs = {"K": want.shape[1], "N": want.shape[0], "bits": bits, "block_size": 32}
            got = dequantize_blocks(attrs, q, scales).T
            diff = float(np.abs(got - want).max())
            entry["max_abs_diff"] = max(entry.get("max_abs_diff", 0.0), diff)
        elif kind == "Q4_1":
            one = _q4_1(raw, tuple(int(x) for x in t.shape))
            for k, v in one.items():
                if k.startswith("blocks"):
                    entry[k] = entry.get(k, 0) + v
                else:
                    entry[k] = max(entry.get(k, 0.0), v)
    return {"file": path.name, "bytes": path.stat().st_size, "types": per_type}


def _path(name: str, folder: Path) -> Path:
    if name == "tests-tiny":
        from tests.checkpoints import write_gguf

        path = folder / "tiny.gguf"
        write_gguf(path, vocab=300, layers=2, quantized=True)
        return path
    if name.endswith(".gguf"):
        return Path(name)
    from surgery.zoo import fetch

    path = fetch(name)
    if path.suffix != ".gguf":
        raise SystemExit(f"{name}: not a GGUF checkpoint ({path})")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    add_output(parser, None, help="write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = [measure(_path(m, Path(folder))) for m in args.models]
    data = {"machine": machine(), "results": results}
    text = json.dumps(data, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
