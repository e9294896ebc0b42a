"""The node-local staging area shared by the loader and the compute service (claim checks)."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import time
import uuid
from pathlib import Path

from shared.core.names import checked_token


class Staging:
    """Files under root/<request id>/: chunks the loader fetched, chunks compute wrote back."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def request_dir(self, request_id: str) -> Path:
        """The directory of one request (its id is checked to be a plain subject token)."""
        return self.root / checked_token(request_id, "request id")

    def write(self, request_id: str, name: str, data: bytes) -> str:
        """Write data atomically (temporary name, then rename); the file's path."""
        directory = self.request_dir(request_id)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / name
        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return str(final)

    def incoming(self, request_id: str, name: str) -> Incoming:
        """A file to be read into in place (see Incoming); commit() stages it as name."""
        directory = self.request_dir(request_id)
        directory.mkdir(parents=True, exist_ok=True)
        return Incoming(directory / name, directory / f".tmp-{uuid.uuid4().hex}")

    def inside(self, path: str) -> Path:
        """The resolved path, or ValueError when it is not inside the staging root."""
        resolved = Path(path).resolve()
        if self.root.resolve() not in resolved.parents:
            raise ValueError(f"{path} is outside the staging area")
        return resolved

    def owned(self, path: str, request_id: str) -> Path:
        """The resolved path, or ValueError when it is not a file of this request's."""
        resolved = self.inside(path)
        if resolved.parent != self.request_dir(request_id).resolve():
            raise ValueError(f"{path} is not staged for request {request_id}")
        return resolved

    def read(self, path: str) -> bytearray:
        """A staged file's bytes (writable, so tensors can use them without a copy)."""
        resolved = self.inside(path)
        with resolved.open("rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)
            f.readinto(data)
        return data

    def map(self, path: str) -> memoryview:
        """A staged file mapped copy-on-write: writable without a copy (tensors can use it),
        and nothing written reaches the file. It stays valid after the file is removed."""
        resolved = self.inside(path)
        with resolved.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return memoryview(bytearray())
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))

    def discard(self, path: str) -> None:
        """Remove one staged file (missing is fine; a path outside the root is refused)."""
        self.inside(path).unlink(missing_ok=True)

    def discard_request_if_empty(self, request_id: str) -> None:
        """Remove a request's directory once nothing is staged in it."""
        with contextlib.suppress(OSError):
            self.request_dir(request_id).rmdir()

    def discard_request(self, request_id: str) -> None:
        """Remove everything staged for a request."""
        shutil.rmtree(self.request_dir(request_id), ignore_errors=True)

    def usage_bytes(self) -> int:
        """Bytes of every file staged now, by whichever service on this node wrote it."""
        total = 0
        for directory, _, files in os.walk(self.root):
            for name in files:
                with contextlib.suppress(OSError):  # removed while we looked
                    total += os.stat(os.path.join(directory, name)).st_size
        return total

    def sweep(self, older_than_s: float) -> int:
        """Remove request directories untouched for older_than_s (left by crashed services)."""
        cutoff = time.time() - older_than_s
        removed = 0
        for d in self.root.iterdir():
            if d.is_dir() and d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed


class Incoming:
    """A staged file read into in place: allocate() sizes a temporary file and maps it shared
    (a reader fills the mapping: one copy, straight into the page cache of the staging area),
    commit() renames it into place, discard() removes it."""

    def __init__(self, final: Path, tmp: Path) -> None:
        self.final, self.tmp = final, tmp
        self.mapping: mmap.mmap | None = None

    def allocate(self, size: int) -> memoryview:
        """The file, `size` bytes long, as a writable buffer."""
        fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if size == 0:
                return memoryview(bytearray())
            # blocks allocated now: a full tmpfs is an OSError here, not a SIGBUS at a write
            os.posix_fallocate(fd, 0, size)
            self.mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return memoryview(self.mapping)

    def unmap(self) -> None:
        """Drop the mapping (once every view of it is released; else when they are)."""
        if self.mapping is not None:
            with contextlib.suppress(BufferError):  # a view still held: it unmaps with them
                self.mapping.close()
            self.mapping = None

    def commit(self) -> str:
        """Stage the file under its final name; its path."""
        self.unmap()
        os.replace(self.tmp, self.final)
        return str(self.final)

    def discard(self) -> None:
        """Remove the file: it was never staged, or its commit was cut short (it may have
        been renamed into place)."""
        self.unmap()
        self.tmp.unlink(missing_ok=True)
        self.final.unlink(missing_ok=True)
