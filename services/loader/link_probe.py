"""The idle link probe: while the loader reads nothing, it reads a small object now and then,
the way it reads a chunk (into staging, then hashed), so that the mergers' estimate of the link
follows a link that got faster or slower while nobody loaded (CAKE_LINK_PROBE_S)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid

from shared.kv.format import payload_digest
from shared.storage.base import ChunkStore
from shared.storage.staging import Staging

LINK_PROBE_BYTES = 1 << 20  # small beside a chunk: a request that starts mid-probe waits little
PROBE_DIR = "link-probe"  # its staging directory (no request's: the gateway's ids start cmpl-)


class LinkProbe:
    """One node's probe object in its store, and a timed read of it."""

    def __init__(self, store: ChunkStore, staging: Staging, node: str) -> None:
        self.store, self.staging = store, staging
        self.key = hashlib.sha256(f"cake-link-probe:{node}:{uuid.uuid4()}".encode()).hexdigest()

    async def install(self) -> None:
        """Store the probe object (again, when the store evicted it)."""
        await self.store.put(self.key, os.urandom(LINK_PROBE_BYTES))

    async def remove(self) -> None:
        """Delete the probe object."""
        await self.store.delete(self.key)

    async def read_MBps(self) -> float | None:
        """Read the object into staging and hash it, as a chunk read does: MB/s, or None when
        the store no longer held it (it is stored again for the next probe). StoreError and
        OSError pass on."""
        incoming = self.staging.incoming(PROBE_DIR, uuid.uuid4().hex)
        buffer = incoming.allocate(LINK_PROBE_BYTES)  # (making the file is no part of the link)
        try:
            started = time.perf_counter()
            data = await self.store.get_into(self.key, lambda _: buffer)
            if data is None:
                await self.install()
                return None
            await asyncio.to_thread(payload_digest, data)
            seconds, nbytes = time.perf_counter() - started, len(data)
            data.release()
            return nbytes / seconds / 1e6 if seconds > 0 else None
        finally:
            incoming.discard()
