"""Two tiers in one store: a near one (a local directory) in front of a far one (S3)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from shared.core.errors import StoreError
from shared.storage.base import Allocate, ChunkStore

log = structlog.get_logger(__name__)

NEAR, FAR = "near", "far"


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
    (`promote`), so the node's next read of it is local (read-through). Writes go to both, near
    first, so a write that far refuses (a full or unreachable bucket) still serves this node;
    the far failure is raised. Deletes (a corrupt chunk) remove both copies. `tiers` says where
    each key is, and `take_reads` what each tier served: the loader reports both, so the
    estimator learns each tier's pace.
    """

    def __init__(self, near: ChunkStore, far: ChunkStore) -> None:
        self.near, self.far = near, far
        self.batch_concurrency = far.batch_concurrency
        self.window = {NEAR: TierReads(), FAR: TierReads()}
        self._read_far: set[str] = set()  # keys read far and not yet promoted
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
                if tier == FAR:
                    self._read_far.add(key)
                return view
        return None

    async def promote(self, key: str, data: memoryview) -> None:
        """A chunk just read far was verified: copy it near, in the background."""
        if key not in self._read_far:
            return
        self._read_far.discard(key)
        task = asyncio.create_task(self._fill(key, bytes(data)))
        self._filling.add(task)
        task.add_done_callback(self._filling.discard)

    async def _fill(self, key: str, data: bytes) -> None:
        try:
            await self.near.put(key, data)
        except StoreError as exc:  # the far copy still serves
            log.warning("could not copy a chunk to the near tier", key=key[:16], error=str(exc))

    async def put(self, key: str, data: bytes) -> None:
        """Write near, then far (a far failure is raised; the near copy stays)."""
        await self.near.put(key, data)
        await self.far.put(key, data)

    async def delete(self, key: str) -> None:
        """Remove key from both tiers."""
        self._read_far.discard(key)
        await self.near.delete(key)
        await self.far.delete(key)

    def take_reads(self) -> dict[str, TierReads]:
        """What each tier served since the last call."""
        window, self.window = self.window, {NEAR: TierReads(), FAR: TierReads()}
        return window

    def usage_bytes(self) -> int | None:
        """The near tier's usage (the far one is bounded by its own rules)."""
        return self.near.usage_bytes()
