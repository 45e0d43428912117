"""How a base model is quantized: the settings of `--quantize` and its options, validated where they are made.

Torch-free, so an export plan (`exporters/plan.py`) checks them before anything heavy is imported; the quantizing
itself is `exporters/quantize.py`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from surgery.errors import SurgeryError

BITS = {"int4": 4, "int8": 8}
# ONNX Runtime's weight-only algorithms that need no calibration data: its own blockwise min/max rounding
# ("default"), half-quadratic (HQQ), and Intel Neural Compressor's round-to-nearest and k-quant (int4 only).
ALGORITHMS = ("default", "hqq", "rtn", "k_quant")
INT4_ONLY = ("rtn", "k_quant")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits' compute type: unset, fp32, fp16, bf16, int8
# Accuracy level 4 (int8 activations, quantized per block at run time) against torch with the dequantized weights,
# (atol, rtol of max|torch|). No weight-only reference reproduces the rounding of the activations, and it grows with
# depth and with the activations' range (benchmarks/results/quantized_2026-12-07.md), so this bound is loose; the
# weights themselves are held to the float tolerance by a second check of the same model at fp32 compute (`at_fp32`).
LEVEL4_TOLERANCES = (1e-2, 1e-1)


@dataclass(frozen=True)
class Quantization:
    """How the base model's MatMul weights are quantized (ONNX Runtime's `MatMulNBitsQuantizer` options)."""

    bits: int = 4  # 4 or 8
    block_size: int = 32  # rows of the weight (its input features) per scale
    accuracy_level: int = 0  # MatMulNBits' compute type: 0 unset (fp32 on CPU), 1 fp32, 2 fp16, 3 bf16, 4 int8
    symmetric: bool = True  # no zero points (signed blocks), as onnxruntime-genai's builder writes
    algorithm: str = "default"
    head: bool = True  # quantize the output projection (lm_head) too, as onnxruntime-genai's builder does
    gguf: str | None = None  # the GGUF file the model was loaded from: its Q4_0 / Q8_0 blocks carried as they are

    def __post_init__(self) -> None:
        if self.bits not in BITS.values():
            raise SurgeryError(f"--quantize: {self.bits} bits; choose int4 or int8")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise SurgeryError(f"--block-size {self.block_size}: give a power of two, 16 or more (32 is usual)")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise SurgeryError(
                f"--accuracy-level {self.accuracy_level}: choose 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)"
            )
        if self.algorithm not in ALGORITHMS:
            raise SurgeryError(f"--quant-algorithm {self.algorithm}: choose one of {', '.join(ALGORITHMS)}")
        if self.algorithm in INT4_ONLY and self.bits != 4:
            raise SurgeryError(f"--quant-algorithm {self.algorithm} writes int4 only; use --quantize int4")

    @classmethod
    def named(cls, name: str, **options: Any) -> Quantization:
        """From the CLI's `--quantize int4|int8` and the other options."""
        if name not in BITS:
            raise SurgeryError(f"--quantize {name}: choose int4 or int8")
        return cls(bits=BITS[name], **options)

    def tolerances(self, atol: float | None, rtol: float | None, default: tuple[float, float]) -> tuple[float, float]:
        """(atol, rtol) against the dequantized reference: the given ones, else `default` (the float model's) at
        accuracy levels 0 and 1, fp16's and bf16's at levels 2 and 3, and `LEVEL4_TOLERANCES` at level 4."""
        import torch

        from surgery.parity import HALF_TOLERANCES

        half = {2: torch.float16, 3: torch.bfloat16}
        base = (
            LEVEL4_TOLERANCES
            if self.accuracy_level == 4
            else HALF_TOLERANCES[half[self.accuracy_level]]
            if self.accuracy_level in half
            else default
        )
        return (base[0] if atol is None else atol, base[1] if rtol is None else rtol)

    def to_json(self) -> dict[str, Any]:
        settings = asdict(self)
        del settings["gguf"]  # a local path; the record names the file
        return settings
