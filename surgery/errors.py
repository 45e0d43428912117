"""The one error type a user sees: defined in the runtime (`runtime/errors.py`), which imports nothing of the
exporter, and the same class here."""

from runtime.errors import SurgeryError

__all__ = ["SurgeryError"]
