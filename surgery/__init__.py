"""surgery: insert, merge and export adapters in the torch.fx graph of a pretrained Transformer."""

from surgery.errors import SurgeryError

__version__ = "0.1.0"

__all__ = ["SurgeryError", "__version__", "open"]


def open(path, trust: bool = False):  # noqa: A001, ANN001, ANN201  the tool's entry point for a torch training loop
    """An `.adapted.pt2` opened for training: an `AdaptedModel` (surgery/adapted.py) with `.module`, `.manifest`,
    `trainable_parameters()`, `train()` / `eval()` and `save(path)`. torch is imported here, on first use."""
    from surgery.adapted import open_adapted_model

    return open_adapted_model(path, trust=trust)
