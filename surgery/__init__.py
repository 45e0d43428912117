"""surgery: insert, merge and export adapters in the torch.fx graph of a pretrained Transformer."""

from surgery.errors import SurgeryError

__version__ = "0.1.0"

__all__ = ["SurgeryError", "__version__"]
