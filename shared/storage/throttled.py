"""A wrapper that emulates a slower storage tier by limiting the read bandwidth of a store,
constant or following a time trace (CAKE_STORE_BANDWIDTH_TRACE) that may repeat."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

from shared.core.bandwidth import BandwidthTrace
from shared.core.errors import ConfigError
from shared.storage.base import Allocate, ChunkStore


class ThrottledStore(ChunkStore):
    """Limits ``get`` of the wrapped store to one shared link of a fixed or time-varying bandwidth.

    Give exactly one of ``bandwidth_MBps`` (constant) or ``trace`` (a BandwidthTrace, or its
    steps), its clock starting at ``start()``. Reads share the link: a read of n bytes
    reserves the link from ``max(issue time, link free time)`` until n bytes have passed, and
    returns when its reservation ends, so two concurrent reads take as long as one read of
    twice the size. A miss transfers nothing; exists/put/delete pass through. MB = 1e6 bytes.
    """

    def __init__(
        self,
        inner: ChunkStore,
        bandwidth_MBps: float | None = None,
        trace: BandwidthTrace | Sequence[tuple[float, float]] | None = None,
    ) -> None:
        if (bandwidth_MBps is None) == (trace is None):
            raise ConfigError("ThrottledStore needs exactly one of bandwidth_MBps or trace")
        if bandwidth_MBps is not None:
            if not bandwidth_MBps > 0:
                raise ConfigError(f"bandwidth_MBps must be > 0, got {bandwidth_MBps}")
            trace = [(0.0, bandwidth_MBps)]
        assert trace is not None
        if not isinstance(trace, BandwidthTrace):
            trace = BandwidthTrace(tuple((float(t), float(r)) for t, r in trace))
        self.trace = trace
        self.inner = inner
        self.batch_concurrency = inner.batch_concurrency
        self._t0: float | None = None
        self._free_at = -math.inf  # when (on the trace's clock) the link is next free

    async def start(self) -> None:
        """Start the wrapped store; the trace's clock starts at the first call (or at its
        epoch, when it has one)."""
        await self.inner.start()
        if self._t0 is None:
            loop = asyncio.get_running_loop()
            epoch = self.trace.epoch
            self._t0 = loop.time() - (0.0 if epoch is None else time.time() - epoch)

    async def close(self) -> None:
        """Close the wrapped store."""
        await self.inner.close()

    async def exists(self, key: str) -> bool:
        """Pass-through."""
        return await self.inner.exists(key)

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Pass-through (keeps the wrapped store's own batching)."""
        return await self.inner.exists_many(keys)

    async def get(self, key: str) -> bytes | None:
        """Read from the wrapped store, returning once the bytes have crossed the emulated link."""
        issued = self._now()
        data = await self.inner.get(key)
        if data:
            await self.cross(issued, len(data))
        return data

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        """Read into a buffer from the wrapped store, returning once it has crossed the link."""
        issued = self._now()
        view = await self.inner.get_into(key, allocate)
        if view is not None and len(view):
            await self.cross(issued, len(view))
        return view

    async def cross(self, issued: float, nbytes: int) -> None:
        """Wait until nbytes asked for at `issued` have crossed the emulated link."""
        end = self.transfer_end(max(issued, self._free_at), nbytes)
        self._free_at = end
        while (remaining := end - self._now()) > 0:
            await asyncio.sleep(remaining)

    async def put(self, key: str, data: bytes) -> None:
        """Pass-through."""
        await self.inner.put(key, data)

    async def delete(self, key: str) -> None:
        """Pass-through."""
        await self.inner.delete(key)

    def usage_bytes(self) -> int | None:
        """The wrapped store's usage."""
        return self.inner.usage_bytes()

    def transfer_end(self, start_s: float, nbytes: int) -> float:
        """When (seconds after start()) nbytes starting at start_s finish, integrating the trace."""
        return self.trace.transfer_end(start_s, nbytes)

    def _now(self) -> float:
        if self._t0 is None:
            raise RuntimeError("ThrottledStore used before start()")
        return asyncio.get_running_loop().time() - self._t0
