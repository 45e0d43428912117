"""The runtime's classes under their former home: they live in the `runtime` package, which imports no torch."""

from runtime.adapted import AdaptedSession  # noqa: F401
from runtime.generate import Generation, Generator, _sample  # noqa: F401
from runtime.packs import ORT_TYPES  # noqa: F401
from runtime.session import DEVICES, session_device  # noqa: F401
from runtime.tokenizer import TextTokenizer  # noqa: F401
