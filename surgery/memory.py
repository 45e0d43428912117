"""The memory this process may still use: what the system reports available, capped by its cgroup's room. Read by
the export's switch to the streamed path (exporters/budget.py) and by the parity check's float64 reference
(surgery/parity.py)."""

from __future__ import annotations

from pathlib import Path


def available() -> int | None:
    """Bytes available now (`MemAvailable`, capped by a cgroup v2 limit less its use); None where neither is known."""
    known = [x for x in (_meminfo("MemAvailable"), _cgroup_room()) if x is not None]
    return min(known) if known else None


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """A cgroup v2 memory limit less what the cgroup uses, where one is set."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
