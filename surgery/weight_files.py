"""The names of a Hugging Face folder's safetensors weights, and the dtypes their headers spell."""

from __future__ import annotations

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
INDEX = "model.safetensors.index.json"  # a sharded folder's map of tensor names to shard files
SINGLE = "model.safetensors"  # an unsharded folder's one file
