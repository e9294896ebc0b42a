"""A benchmark's scratch directory, laid out as a default deployment would be."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from shared.runtime.config import staging_base


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A fresh directory for one benchmark run, removed afterwards. Its store goes under it,
    on disk (the benchmarks drop its page cache for cold reads); `staging` in it (and
    `staging-in-process`, for a stack in the benchmark's own process) links to a fresh
    directory where a default deployment stages (shared memory, /dev/shm, when there is
    room), so the load path copies into the same kind of memory as in production."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as workdir,
        tempfile.TemporaryDirectory(prefix=prefix, dir=staging_base()) as staging,
    ):
        for name in ("staging", "staging-in-process"):
            (Path(staging) / name).mkdir()
            (Path(workdir) / name).symlink_to(Path(staging) / name, target_is_directory=True)
        yield Path(workdir)
