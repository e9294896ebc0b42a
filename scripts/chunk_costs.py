"""What one stored chunk costs on the load path, step by step, on this machine: the floor
under `cake bench --ceiling`'s delivered rate (docs/benchmarks.md, Load-path ceiling).

    python scripts/chunk_costs.py [--mb 4.2] [--staging /dev/shm]

Each step is timed alone on one warm file (page cache warm), median of 40: a plain read into a
reused buffer (the raw rate's read), the payload digest, the loader's read into a fresh staged
file (a file made, its blocks allocated, mapped and read into, as shared.storage.staging does),
and compute's copy of a staged file into a slot (mapped, then copied).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from blake3 import blake3


def median_ms(step: Callable[[], object], reps: int = 40) -> float:
    """Median milliseconds of reps runs of step."""
    runs = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=4.2, help="chunk size in MB (default 4.2)")
    parser.add_argument("--staging", default="/dev/shm", help="where staged files go")
    args = parser.parse_args()
    size = int(args.mb * 1e6)
    with (
        tempfile.TemporaryDirectory() as store,
        tempfile.TemporaryDirectory(dir=args.staging) as staging,
    ):
        stored = Path(store) / "chunk"
        stored.write_bytes(os.urandom(size))
        payload = stored.read_bytes()
        reused = bytearray(size)
        staged = Path(staging) / "staged"
        staged.write_bytes(payload)
        slot = torch.empty(size, dtype=torch.uint8)

        def read_reused() -> None:
            with stored.open("rb", buffering=0) as f:
                f.readinto(reused)

        def read_into_staged() -> None:
            fd = os.open(Path(staging) / "incoming", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size)
            os.close(fd)
            with stored.open("rb", buffering=0) as f:
                f.readinto(mapping)
            mapping.close()
            os.unlink(Path(staging) / "incoming")

        def staged_into_slot() -> None:
            with staged.open("rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            slot.copy_(torch.frombuffer(mapping, dtype=torch.uint8))

        steps = {
            "read into a reused buffer": read_reused,
            "BLAKE3 digest": lambda: blake3(payload).digest(),
            "read into a fresh staged file": read_into_staged,
            "staged file into a slot": staged_into_slot,
        }
        for name, step in steps.items():
            ms = median_ms(step)
            print(f"{name:32} {ms:6.2f} ms  {size / ms / 1e3:7.0f} MB/s", flush=True)


if __name__ == "__main__":
    main()
