"""Library chatter off: torch.onnx and transformers log and warn at length; the user wants our lines only."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Silence the warnings and logs of torch, transformers, onnxscript and the hub (the CLI and the benchmarks)."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torch", "transformers", "onnxscript", "onnx_ir", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
