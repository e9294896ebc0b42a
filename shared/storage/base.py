"""The one small storage interface every chunk store implements."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence

#: given an object's size, a writable buffer of that size to read it into (called at most once,
#: possibly in a worker thread)
Allocate = Callable[[int], memoryview]

NEAR, FAR = "near", "far"  # a chunk's tier: a local directory in front, or the store itself


def leading(found: Sequence[object]) -> int:
    """How many leading entries are set (a chained key list's stored prefix, from what each key
    was found as)."""
    return next((i for i, one in enumerate(found) if not one), len(found))


def new_buffer(size: int) -> memoryview:
    """A fresh writable buffer of size bytes (the plain Allocate)."""
    return memoryview(bytearray(size))


class ChunkStore(abc.ABC):
    """An async key -> bytes store for serialized KV chunks.

    Keys are lowercase hex strings (see shared.core.keys). A value is visible only once it is
    completely written. ``get`` of a missing key returns None; backend failures raise
    shared.core.errors.StoreError. Stores are async context managers: ``async with store: ...``.
    """

    #: how many keys the default batched helpers look at concurrently
    batch_concurrency: int = 16

    async def start(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Acquire resources (clients, directory scan). Idempotent."""

    async def close(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Release resources. Idempotent, safe after a failed start."""

    async def __aenter__(self) -> ChunkStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether a complete value is stored under key."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value stored under key, or None when there is none."""

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        """Read the value under key into a buffer from allocate; the filled buffer, or None when
        there is none. This default copies get()'s bytes; stores override it to read in place."""
        data = await self.get(key)
        if data is None:
            return None
        buffer = allocate(len(data))
        buffer[:] = data
        return buffer

    async def get_copy(self, key: str) -> bytes | None:
        """get() for stores whose get_into reads in place: into a new buffer, as bytes."""
        view = await self.get_into(key, new_buffer)
        return None if view is None else bytes(view)

    async def promote(self, key: str, data: memoryview) -> None:  # noqa: B027 (a no-op hook)
        """The value under key, just read with get_into, was verified: a store with tiers may
        keep it nearer (the caller may release data once this returns)."""

    async def drop_corrupt(self, key: str) -> None:
        """The value under key, just read, failed verification: remove it (a store with tiers
        removes only the copy that was read)."""
        await self.delete(key)

    async def shared_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are stored where every node reads them (what a write-back must fill);
        exists_many for a store of one tier."""
        return await self.exists_many(keys)

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store data under key atomically; an existing value is replaced."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove key; removing a missing key is not an error."""

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """exists() for many keys, in order, with bounded concurrency."""
        sem = asyncio.Semaphore(self.batch_concurrency)

        async def one(key: str) -> bool:
            async with sem:
                return await self.exists(key)

        return list(await asyncio.gather(*(one(k) for k in keys)))

    async def tiers(self, keys: Sequence[str]) -> list[str | None]:
        """Which tier holds each key: NEAR (a local tier in front, shared.storage.tiered) or
        FAR (the store itself), None when none does."""
        return [FAR if here else None for here in await self.exists_many(keys)]

    async def stored_prefix(self, keys: Sequence[str]) -> int:
        """How many leading keys are stored (the longest stored prefix of a chained key list)."""
        return leading(await self.exists_many(keys))

    def usage_bytes(self) -> int | None:
        """Bytes currently stored, where the store tracks it (None otherwise)."""
        return None
