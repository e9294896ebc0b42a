"""An in-process, dict-backed chunk store (tests, single-process runs, a small hot tier)."""

from __future__ import annotations

from collections import OrderedDict

import structlog

from shared.storage.base import ChunkStore

log = structlog.get_logger(__name__)


class MemoryStore(ChunkStore):
    """Keeps values in a dict; with a byte capacity it evicts the least recently used keys.

    ``get`` refreshes a key's recency. A value larger than the whole capacity is not stored.
    """

    def __init__(self, capacity_bytes: int | None = None) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._usage = 0

    async def exists(self, key: str) -> bool:
        """Whether key is stored (does not refresh recency)."""
        return key in self._data

    async def get(self, key: str) -> bytes | None:
        """The value under key (and mark it most recently used), or None."""
        data = self._data.get(key)
        if data is not None:
            self._data.move_to_end(key)
        return data

    async def put(self, key: str, data: bytes) -> None:
        """Store data under key, evicting least recently used keys to stay within capacity."""
        size = len(data)
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            log.warning(
                "store.put_skipped_too_large", key=key, size=size, capacity=self.capacity_bytes
            )
            return
        self._remove(key)
        self._data[key] = bytes(data)
        self._usage += size
        if self.capacity_bytes is not None:
            while self._usage > self.capacity_bytes:
                victim = next(iter(self._data))
                self._remove(victim)
                log.debug("store.evicted", key=victim)

    async def delete(self, key: str) -> None:
        """Remove key if present."""
        self._remove(key)

    def usage_bytes(self) -> int:
        """Bytes currently stored."""
        return self._usage

    def _remove(self, key: str) -> None:
        old = self._data.pop(key, None)
        if old is not None:
            self._usage -= len(old)
