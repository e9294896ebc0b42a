"""Resident memory of a process, read from /proc (Linux): now, at its peak, and sampled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path


def status_kib(pid: int, field: str) -> int | None:
    """A memory field of /proc/<pid>/status in KiB (VmRSS: now, VmHWM: the peak so far);
    None where there is no such process or field."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


@dataclass
class Peak:
    """The highest resident memory sampled (MiB; None before any sample could be read)."""

    mib: float | None = None

    def add(self, kib: int | None) -> None:
        """One sample."""
        if kib is not None:
            self.mib = max(self.mib or 0.0, kib / 1024)


@contextlib.asynccontextmanager
async def sampled_peak(pid: int, interval_s: float = 0.05) -> AsyncIterator[Peak]:
    """The peak VmRSS of a process while the block runs, sampled every interval_s."""
    peak = Peak()

    async def sample() -> None:
        while True:
            peak.add(status_kib(pid, "VmRSS"))
            await asyncio.sleep(interval_s)

    task = asyncio.create_task(sample())
    try:
        yield peak
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        peak.add(status_kib(pid, "VmRSS"))
