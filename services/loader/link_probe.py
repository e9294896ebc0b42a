"""The idle link probe: while the loader reads nothing, it reads a small object now and then,
so that the mergers' estimate of the link follows a link that got faster or slower while
nobody loaded (CAKE_LINK_PROBE_S).

One small read is not a fetch: on a real network its first byte's latency weighs more, and a
fetch reads several chunks at once (S3: in ranged parts). So a reading is used only as a ratio:
the first probe after chunk reads anchors their pace a chunk to the probe's rate then, and each
later reading scales that pace by how much the link changed since (`LinkPace`)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from dataclasses import dataclass

from shared.storage.base import ChunkStore
from shared.storage.staging import Staging

LINK_PROBE_BYTES = 1 << 20  # small beside a chunk: a request that starts mid-probe waits little
PROBE_DIR = "link-probe"  # its staging directory (no request's: the gateway's ids start cmpl-)


class LinkProbe:
    """One node's probe object in its store, and a timed read of it."""

    def __init__(self, store: ChunkStore, staging: Staging, node: str) -> None:
        self.store, self.staging = store, staging
        # one key a node (and size): a loader that crashed leaves nothing that its successor does
        # not reuse; when one loader of a node stops and removes it, the others store it again
        ident = f"cake-link-probe:{node}:{LINK_PROBE_BYTES}"
        self.key = hashlib.sha256(ident.encode()).hexdigest()

    async def install(self) -> None:
        """Store the probe object (again, when the store lost it)."""
        await self.store.put(self.key, os.urandom(LINK_PROBE_BYTES))

    async def remove(self) -> None:
        """Delete the probe object."""
        await self.store.delete(self.key)

    async def timed_read_MBps(self) -> float | None:
        """Read the object into a staged file, as a chunk read does (the file made first, and
        not hashed after: neither is the link): MB/s, or None when the store no longer held it
        (it is stored again for the next probe). StoreError and OSError pass on."""
        incoming = self.staging.incoming(PROBE_DIR, uuid.uuid4().hex)
        try:
            buffer = incoming.allocate(LINK_PROBE_BYTES)  # (making the file is not the link's)
            started = time.perf_counter()
            data = await self.store.get_into(self.key, lambda _: buffer)
            seconds = time.perf_counter() - started
            if data is None:
                await self.install()
                return None
            nbytes = len(data)
            data.release()
            return nbytes / seconds / 1e6 if seconds > 0 else None
        finally:
            incoming.discard()


@dataclass
class LinkPace:
    """The link's pace a chunk as the last chunk reads found it, anchored to the probe reading
    taken after them: what a later reading says a chunk takes now."""

    reads: int = 0  # chunk reads since the last probe
    busy_s: float = 0.0  # the time they kept the link busy
    chunk_s: float | None = None  # the pace a chunk of the reads before the anchor
    anchor_MBps: float | None = None  # the probe's reading just after them

    def saw(self, reads: int, busy_s: float) -> None:
        """A telemetry window's chunk reads of the link and their busy time (a window without
        a finished read says nothing of the pace, as the mergers read it too)."""
        if reads > 0:
            self.reads += reads
            self.busy_s += busy_s

    def probed(self, MBps: float) -> float | None:
        """A probe read the link at MBps: a chunk's load time now, or None when chunk reads
        came since the last probe (this reading anchors their pace) or none ever did."""
        if self.reads and self.busy_s > 0:
            self.chunk_s, self.anchor_MBps = self.busy_s / self.reads, MBps
            self.reads, self.busy_s = 0, 0.0
            return None
        if self.chunk_s is None or self.anchor_MBps is None or MBps <= 0:
            return None
        return self.chunk_s * self.anchor_MBps / MBps
