"""Memory caps for benchmarks: a cgroup v1 memory group around one process.

The honest baseline for a flash-resident model is stock llama.cpp under the
same memory cap, so benchmarks run each variant in a fresh process inside
its own memory cgroup (page cache it reads is charged to the group too).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from neuralink.errors import CgroupUnavailable

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")


@dataclass
class MemoryCgroup:
    """A memory cgroup; `path` is its directory under the v1 memory controller."""

    path: Path

    @classmethod
    def create(cls, limit_bytes: int | None, prefix: str = "neuralink-bench") -> MemoryCgroup:
        """A new group limited to limit_bytes (None: no limit, still measured); CgroupUnavailable if we cannot."""
        if not (MEMORY_ROOT / "memory.limit_in_bytes").exists():
            raise CgroupUnavailable(f"{MEMORY_ROOT} is not a cgroup v1 memory controller")
        path = MEMORY_ROOT / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot create {path}: {e.strerror} (benchmarks with a memory cap need root)") from None
        group = cls(path)
        try:
            if limit_bytes is not None:
                # no swap: the cap is a cap on memory, not a push into swap
                (path / "memory.swappiness").write_text("0")
                (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        except OSError as e:
            group.remove()
            raise CgroupUnavailable(f"cannot limit {path}: {e.strerror}") from None
        return group

    def join(self, pid: int = 0) -> None:
        """Move a process (default: this one) into the group; later allocations are charged to it."""
        (self.path / "cgroup.procs").write_text(str(pid or os.getpid()))

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def oom_killed(self) -> bool:
        text = (self.path / "memory.oom_control").read_text()
        return any(line.split()[0] == "oom_kill" and int(line.split()[1]) > 0 for line in text.splitlines())

    def remove(self) -> None:
        """Delete the group (its processes must have exited)."""
        try:
            self.path.rmdir()
        except OSError:
            pass
