"""A chunk store on a local directory: one file per key, atomic writes, LRU eviction by bytes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog

from shared.core.errors import StoreError
from shared.storage.base import Allocate, ChunkStore

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: shortest and longest key accepted (a 64-bit digest up to a full blake2b-512 digest, in hex)
KEY_MIN_LEN = 16
KEY_MAX_LEN = 128
#: temporary files start with a dot, which no valid (hex) key can
TMP_PREFIX = ".tmp-"

_KEY_RE = re.compile(rf"[0-9a-f]{{{KEY_MIN_LEN},{KEY_MAX_LEN}}}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")


def validate_key(key: str) -> str:
    """Return key if it is lowercase hex of a sensible length, else raise ValueError.

    This is what keeps a key from ever naming a path outside the store's root.
    """
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(
            f"invalid chunk key {key!r}: expected {KEY_MIN_LEN}-{KEY_MAX_LEN} lowercase hex chars"
        )
    return key


class LocalStore(ChunkStore):
    """Stores each value in ``root/<key[:2]>/<key>``; evicts least recently used files by bytes.

    A put writes a unique temporary file in the target directory, fsyncs it and renames it
    over the key's file, so a value is visible only once complete. Recency is kept in the
    files' modification times (``get`` refreshes it), so ``start()`` rebuilds both the usage
    and the LRU order from the directory and removes stale temporary files.

    Several loaders may share one directory (nodes on one host, or a shared file system):
    what is stored is what the directory holds, so a lookup and a read see files another
    instance wrote. The in-memory index orders eviction; each instance evicts only what it
    knows, so the capacity holds per instance, not for the directory as a whole.
    """

    def __init__(self, root: str | Path, capacity_bytes: int | None = None) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> size, least recent first
        self._usage = 0
        self._last_stamp = 0
        self._lock = asyncio.Lock()
        self._started = False

    async def start(self) -> None:
        """Scan the directory: rebuild usage and LRU order, delete stale temporary files."""
        async with self._lock:
            if self._started:
                return
            entries, stale = await self._io("scan", _scan, self.root)
            self._index.clear()
            self._usage = 0
            for key, size, mtime_ns in entries:
                self._index[key] = size
                self._usage += size
                self._last_stamp = max(self._last_stamp, mtime_ns)
            self._started = True
            if stale:
                log.info("store.stale_tmp_removed", root=str(self.root), count=stale)
            await self._evict_locked()

    async def close(self) -> None:
        """Forget the in-memory index; the files stay. Idempotent."""
        async with self._lock:
            self._started = False
            self._index.clear()
            self._usage = 0

    async def exists(self, key: str) -> bool:
        """Whether key's file is there (does not refresh recency)."""
        return (await self.exists_many([key]))[0]

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """exists() for many keys, with one trip to a worker thread."""
        paths = [self._path(key) for key in keys]
        return await self._io("stat", _all_exist, paths)

    async def get(self, key: str) -> bytes | None:
        """Read the value under key and mark it most recently used; None when missing."""
        return await self.get_copy(key)  # (the loader reads with get_into)

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        """Read the value under key straight into allocate's buffer (one copy, in a worker
        thread) and mark it most recently used; None when missing."""
        path = self._path(key)
        data = await self._io("read", _read_and_touch, path, self._next_stamp(), allocate)
        if data is not None:
            if key in self._index:
                self._index.move_to_end(key)
            return data
        async with self._lock:  # the file vanished: drop it unless a put re-created it
            if key in self._index and not await self._io("stat", path.exists):
                self._forget(key)
        return None

    async def put(self, key: str, data: bytes) -> None:
        """Write data atomically under key, then evict LRU files beyond the capacity.

        A value larger than the whole capacity is skipped (logged, not an error).
        """
        path = self._path(key)
        size = len(data)
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            log.warning(
                "store.put_skipped_too_large", key=key, size=size, capacity=self.capacity_bytes
            )
            return
        tmp = await self._io("write", _write_tmp, path.parent, data)
        # Shielded so a cancelled caller cannot leave a renamed file the index does not know.
        await asyncio.shield(self._install(key, tmp, path, size))

    async def delete(self, key: str) -> None:
        """Remove key's file if present."""
        path = self._path(key)
        async with self._lock:
            self._forget(key)
            await self._io("delete", _unlink_all, [path])

    def usage_bytes(self) -> int:
        """Bytes of the values currently tracked."""
        return self._usage

    async def _install(self, key: str, tmp: Path, path: Path, size: int) -> None:
        async with self._lock:
            try:
                await self._io("rename", _commit, tmp, path, self._next_stamp())
            except BaseException:
                await asyncio.to_thread(_unlink_all, [tmp])
                raise
            self._forget(key)
            self._index[key] = size
            self._usage += size
            await self._evict_locked()

    async def _evict_locked(self) -> None:
        if self.capacity_bytes is None:
            return
        victims: list[Path] = []
        while self._usage > self.capacity_bytes and self._index:
            key, size = self._index.popitem(last=False)
            self._usage -= size
            victims.append(self._path(key))
        if victims:
            log.debug("store.evicted", root=str(self.root), count=len(victims))
            await self._io("evict", _unlink_all, victims)

    def _forget(self, key: str) -> None:
        size = self._index.pop(key, None)
        if size is not None:
            self._usage -= size

    def _path(self, key: str) -> Path:
        validate_key(key)
        if not self._started:
            raise RuntimeError("LocalStore used before start()")
        return self.root / key[:2] / key

    def _next_stamp(self) -> int:
        """A strictly increasing nanosecond timestamp (file mtimes are the persisted LRU order)."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    async def _io(self, what: str, fn: Callable[..., T], *args: object) -> T:
        try:
            return await asyncio.to_thread(fn, *args)
        except OSError as e:
            raise StoreError(f"local store {self.root}: {what} failed: {e}") from e


def _scan(root: Path) -> tuple[list[tuple[str, int, int]], int]:
    """(key, size, mtime_ns) of every stored file, least recent first; stale temp files removed."""
    root.mkdir(parents=True, exist_ok=True)
    entries: list[tuple[str, int, int]] = []
    stale = 0
    with os.scandir(root) as shards:
        for shard in shards:
            if not (_SHARD_RE.fullmatch(shard.name) and shard.is_dir(follow_symlinks=False)):
                continue
            with os.scandir(shard.path) as files:
                for f in files:
                    if f.name.startswith(TMP_PREFIX):
                        _unlink_all([Path(f.path)])
                        stale += 1
                    elif (
                        _KEY_RE.fullmatch(f.name)
                        and f.name[:2] == shard.name
                        and f.is_file(follow_symlinks=False)
                    ):
                        st = f.stat(follow_symlinks=False)
                        entries.append((f.name, st.st_size, st.st_mtime_ns))
    entries.sort(key=lambda e: (e[2], e[0]))
    return entries, stale


def _all_exist(paths: list[Path]) -> list[bool]:
    return [path.is_file() for path in paths]


def _write_tmp(directory: Path, data: bytes) -> Path:
    """Write data to a fresh temporary file in directory and fsync it."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_all([tmp])
        raise
    return tmp


def _commit(tmp: Path, path: Path, stamp_ns: int) -> None:
    """Atomically rename tmp over path and stamp its recency."""
    os.replace(tmp, path)
    os.utime(path, ns=(stamp_ns, stamp_ns))


def _read_and_touch(path: Path, stamp_ns: int, allocate: Allocate) -> memoryview | None:
    """The file read into allocate's buffer (None when missing), refreshing its recency stamp."""
    try:
        with path.open("rb", buffering=0) as f:
            data = allocate(os.fstat(f.fileno()).st_size)
            if f.readinto(data) != len(data):
                raise OSError(f"{path} changed size while it was read")
    except FileNotFoundError:
        return None
    # evicted right after the read: the bytes we hold are still complete
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, ns=(stamp_ns, stamp_ns))
    return data


def _unlink_all(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
