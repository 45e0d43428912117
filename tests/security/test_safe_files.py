"""The pickle scanner on its own: what it lets through and what it refuses, for every pickle protocol."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict

import pytest
import torch

from surgery.pickle_scan import scan_pickles
from tests.security.hostile import Payload


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_a_payload_is_found_in_every_protocol(protocol, tmp_path):
    data = pickle.dumps(Payload(tmp_path / "M"), protocol=protocol)
    assert scan_pickles(data) == "calls posix.system"
    assert scan_pickles(pickle.dumps(1, protocol=2) + data) == "calls posix.system"  # the second of two pickles


@pytest.mark.parametrize("protocol", [2, 4])
def test_tensors_and_state_dicts_pass(protocol):
    buf = io.BytesIO()
    obj = (OrderedDict(w=torch.randn(3, 2), b=torch.zeros(2, dtype=torch.int64)), {"n": 3, "s": {1, 2}})
    torch.save(obj, buf, pickle_protocol=protocol)
    import zipfile

    with zipfile.ZipFile(buf) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    assert scan_pickles(data) is None


def test_a_global_built_on_the_stack_is_refused():
    # STACK_GLOBAL fed from a memo slot holding something the scanner cannot know: refused, not guessed
    data = b"\x80\x04\x8c\x05posix\x94\x8c\x06system\x94(h\x00h\x01t\x85\x93."
    assert scan_pickles(data) is not None
