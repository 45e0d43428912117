"""surgery/pt2_save.py: the archive torch writes, without copying a weight's bytes to write it."""

from __future__ import annotations

import tracemalloc
import zipfile

import torch
from torch import nn

from surgery import pt2_save
from surgery.safe_files import check_pt2


class Tied(nn.Module):
    """A large embedding tied to the head (one storage, two names), a view of a weight, a buffer, a constant."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.proj = nn.Linear(d, d)
        self.register_buffer("scale", torch.rand(d) + 0.5)
        self.offset = torch.randn(d)  # a constant of the program

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * self.scale + self.offset
        return self.head(self.proj(x) + self.proj.weight[0])


def program(vocab: int = 512, d: int = 32) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    return torch.export.export(Tied(vocab, d), (torch.randint(0, vocab, (2, 5)),))


def members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()}


def test_the_archive_is_the_one_torch_writes_and_loads_back(tmp_path):
    ep = program()
    torch.export.save(ep, tmp_path / "torch.pt2", extra_files={"x.json": "{}"})
    pt2_save.save(ep, tmp_path / "ours.pt2", extra_files={"x.json": "{}"})
    theirs, ours = members(tmp_path / "torch.pt2"), members(tmp_path / "ours.pt2")
    assert sorted(ours) == sorted(theirs)
    assert any(k.startswith("data/weights/weight_") for k in ours)
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}
    check_pt2(tmp_path / "ours.pt2", "ours.pt2")
    extra = {"x.json": ""}
    back = torch.export.load(tmp_path / "ours.pt2", extra_files=extra)
    assert extra["x.json"] == "{}"
    ids = torch.randint(0, 512, (2, 5))
    torch.testing.assert_close(back.module()(ids), ep.module()(ids), atol=0, rtol=0)
    state = back.state_dict
    assert state["head.weight"].data_ptr() == state["embed.weight"].data_ptr()  # still one storage


def test_writing_a_weight_does_not_copy_it_into_python(tmp_path):
    """torch's own writer copies each weight into `bytes` first (traced by tracemalloc); this one hands the writer
    the storage, so the traced peak stays far below the largest weight. Both are measured, so the check can fail."""
    ep = program(vocab=65536, d=128)  # a 32 MiB embedding
    largest = 65536 * 128 * 4

    def traced_peak(save) -> int:
        tracemalloc.start()
        try:
            save(ep, tmp_path / "m.pt2")
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert traced_peak(torch.export.save) >= largest  # the copy this module avoids
    assert traced_peak(pt2_save.save) < largest / 8
