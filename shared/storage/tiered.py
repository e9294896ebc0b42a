"""Two tiers in one store: a near one (a local directory) in front of a far one (S3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from shared.core.errors import StoreError
from shared.storage.base import FAR, NEAR, Allocate, ChunkStore

log = structlog.get_logger(__name__)

REMEMBERED_READS = 4096  # reads whose tier is kept until verified (promote, drop_corrupt)


@dataclass
class TierReads:
    """Reads one tier served since the window was last taken."""

    reads: int = 0
    nbytes: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list)  # each read's start, end

    def read(self, started: float, ended: float, nbytes: int) -> None:
        """One read of nbytes, from started to ended (time.monotonic)."""
        self.reads, self.nbytes = self.reads + 1, self.nbytes + nbytes
        self.spans.append((started, ended))

    @property
    def busy_s(self) -> float:
        """Time with at least one of these reads in flight (the union of their spans)."""
        busy, reach = 0.0, float("-inf")
        for start, end in sorted(self.spans):
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return busy


class TieredStore(ChunkStore):
    """A near store in front of a far one, as LMCache's and SGLang HiCache's local tiers are.

    Reads try near, then far; a chunk read far is copied near once the reader has verified it
    (`promote`), so the node's next read of it is local (read-through). A write goes near (a
    failure there is logged: the near tier is a cache) and then far (a failure there is raised,
    and `shared_many` keeps reporting the chunk missing, so the next write-back tries again). A
    corrupt copy is dropped from the tier that served it only (`drop_corrupt`), so one node's bad
    disk never deletes the copy every node shares. `tiers` says where each key is, and
    `take_reads` what each tier served: the loader reports both, so the estimator learns each
    tier's pace. (A near read that fails outright fails that chunk, which is then computed: its
    buffer is already allocated, so it cannot be read far instead.)
    """

    def __init__(self, near: ChunkStore, far: ChunkStore) -> None:
        self.near, self.far = near, far
        self.batch_concurrency = far.batch_concurrency
        self.window = {NEAR: TierReads(), FAR: TierReads()}
        self._served: dict[str, str] = {}  # the tier each recent read came from (oldest first)
        self._filling: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start both tiers."""
        await self.near.start()
        await self.far.start()

    async def close(self) -> None:
        """Let copies in flight land, then close both tiers."""
        await asyncio.gather(*self._filling, return_exceptions=True)
        await self.near.close()
        await self.far.close()

    async def exists(self, key: str) -> bool:
        """Whether either tier holds key."""
        return await self.near.exists(key) or await self.far.exists(key)

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """exists() for many keys: near for all, far for the rest."""
        return [tier is not None for tier in await self.tiers(keys)]

    async def tiers(self, keys: Sequence[str]) -> list[str | None]:
        """Which tier holds each key (NEAR when both do; None when neither)."""
        near = await self.near.exists_many(keys)
        missing = [k for k, here in zip(keys, near, strict=True) if not here]
        far = iter(await self.far.exists_many(missing))
        return [NEAR if here else (FAR if next(far) else None) for here in near]

    async def get(self, key: str) -> bytes | None:
        """The value from near, else from far."""
        data = await self.near.get(key)
        return data if data is not None else await self.far.get(key)

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        """Read into allocate's buffer from near, else from far (timed per tier)."""
        for tier, store in ((NEAR, self.near), (FAR, self.far)):
            started = time.monotonic()
            view = await store.get_into(key, allocate)
            if view is not None:
                self.window[tier].read(started, time.monotonic(), len(view))
                self._served[key] = tier
                while len(self._served) > REMEMBERED_READS:  # reads never verified or dropped
                    del self._served[next(iter(self._served))]
                return view
        return None

    async def promote(self, key: str, data: memoryview) -> None:
        """A chunk just read far was verified: copy it near, in the background."""
        if self._served.pop(key, None) != FAR:
            return
        task = asyncio.create_task(self._fill(key, bytes(data)))
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    async def _fill(self, key: str, data: bytes) -> None:
        try:
            await self.near.put(key, data)
        except StoreError as exc:  # the far copy still serves
            log.warning("could not copy a chunk to the near tier", key=key[:16], error=str(exc))

    async def put(self, key: str, data: bytes) -> None:
        """Write near (a failure is logged), then far (a failure is raised)."""
        await self._fill(key, data)
        await self.far.put(key, data)

    async def shared_many(self, keys: Sequence[str]) -> list[bool]:
        """Which keys the far tier holds: what every node can read."""
        return await self.far.exists_many(keys)

    async def delete(self, key: str) -> None:
        """Remove key from both tiers."""
        self._served.pop(key, None)
        await self.near.delete(key)
        await self.far.delete(key)

    async def drop_corrupt(self, key: str) -> None:
        """Remove the corrupt copy just read: from the tier that served it (both when unknown)."""
        tier = self._served.pop(key, None)
        if tier != FAR:
            await self.near.delete(key)
        if tier != NEAR:
            await self.far.delete(key)

    def take_reads(self) -> dict[str, TierReads]:
        """What each tier served since the last call."""
        window, self.window = self.window, {NEAR: TierReads(), FAR: TierReads()}
        return window

    def usage_bytes(self) -> int | None:
        """The near tier's usage (the far one is bounded by its own rules)."""
        return self.near.usage_bytes()
