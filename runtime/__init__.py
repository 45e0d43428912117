"""The runtime: run what `surgery` exports with numpy, ONNX Runtime, onnx, safetensors and tokenizers alone.

    from runtime import AdaptedSession, Generator

    session = AdaptedSession("model.swappable.onnx")
    session.load("task_a", "task_a.onnx_adapter")
    outputs = session.run(inputs, adapter="task_a")

It imports neither torch nor transformers (a test guards that), and its modules import one another only within
this package, relatively, so the folder can be copied as it is (a serving model folder carries it).
"""

from .adapted import AdaptedSession
from .errors import SurgeryError
from .generate import Generation, Generator
from .packs import Pack, check_pack, load_pack
from .session import CPU, CUDA, ort_session
from .tokenizer import TextTokenizer

__all__ = [
    "CPU",
    "CUDA",
    "AdaptedSession",
    "Generation",
    "Generator",
    "Pack",
    "SurgeryError",
    "TextTokenizer",
    "check_pack",
    "load_pack",
    "ort_session",
]
