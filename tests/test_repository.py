"""What the repository's tracked files say: they speak of the software, not of how it was built, so none refers to an
issue by its number."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT

ISSUE_NUMBER = re.compile(r"issue ?#?[0-9]+", re.IGNORECASE)


def test_no_tracked_file_refers_to_an_issue_number():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    hits = []
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if m := ISSUE_NUMBER.search(line):
                hits.append(f"{name}:{number}: {m.group(0)}")
    assert not hits, "tracked files refer to issue numbers:\n" + "\n".join(hits)
