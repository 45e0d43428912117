"""What an exported ONNX model takes, and inputs checked against it: in the runtime, `runtime/inputs.py`."""

from runtime.inputs import (  # noqa: F401
    ADAPTER_PREFIX,
    CACHE_PREFIX,
    MAX_POSITIONS,
    ORT_DTYPES,
    PASS_THROUGH,
    TOKEN_IDS,
    CacheLayout,
    GraphInput,
    check_cache_feeds,
    check_feeds,
    graph_inputs,
    vocab_size,
)
