"""`torch.export.save` with each weight written from its tensor's storage, not from a copy of its bytes.

torch writes a weight as a raw zip member (`data/weights/weight_N`), but first copies its storage into a Python
`bytes`, which the writer's binding copies again into a C++ string: while the largest tensor is written (often
the embedding) the process holds it three times. `save` hands the writer the
storage itself (`PyTorchFileWriter.write_record(name, storage, nbytes)`, as `torch.save` writes its tensors), so
writing adds nothing to the weights already in memory. The archive is the one torch writes, member for member:
`torch.export.load` and `surgery.archive` read it unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.export.pt2_archive import _package


def _save_raw_tensors(
    raw_items: dict[str, tuple[torch.Tensor, Any]],
    model_name: str,
    archive_writer: _package.PT2ArchiveWriter,
    config: dict[str, Any],
    directory: str,
    filename_prefix: str,
    idx: int,
) -> int:
    """torch's `_save_raw_tensors` (same grouping of shared storages, same records and config), each group's
    storage written in place."""
    if not raw_items:
        return idx
    weights = {model_name: _package.Weights(raw_items)}
    for group in _package.group_weights(weights):
        complete = _package.get_complete_tensor(group, weights)
        path_name = f"{filename_prefix}{idx}"
        archive_path = os.path.join(directory, path_name)
        if _package._is_fake_tensor(complete) or not complete.data_ptr():
            archive_writer.write_bytes(archive_path, b"")
        else:
            storage = complete.cpu().untyped_storage()
            archive_writer.archive_file.write_record(archive_path, storage, storage.nbytes())
        idx += 1
        for _, fqn in group:
            tensor, _ = weights[model_name].get_weight(fqn)
            config[fqn] = _package.schema.PayloadMeta(
                path_name=path_name,
                is_param=isinstance(tensor, torch.nn.Parameter),
                use_pickle=False,
                tensor_meta=_package.serialize_tensor_meta(tensor),
            )
    return idx


@contextlib.contextmanager
def _storage_writer() -> Iterator[None]:
    torch_own = _package._save_raw_tensors
    _package._save_raw_tensors = _save_raw_tensors
    try:
        yield
    finally:
        _package._save_raw_tensors = torch_own


def save(program: torch.export.ExportedProgram, path: str | os.PathLike, **kwargs: Any) -> None:
    """`torch.export.save(program, path, **kwargs)`, each weight written from its storage (see above)."""
    with _storage_writer():
        torch.export.save(program, path, **kwargs)
