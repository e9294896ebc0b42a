"""Stored chunks as bytes: read-and-verify, and store-what-is-missing. No tensors here, so the
loader runs these very steps without torch; shared.kv.engine builds on them for KV tensors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog

from shared.core.errors import CorruptChunkError
from shared.core.keys import PromptChunks
from shared.kv.format import verify_chunk
from shared.storage.base import Allocate, ChunkStore

log = structlog.get_logger(__name__)


async def read_verified(
    store: ChunkStore,
    prompt: PromptChunks,
    index: int,
    allocate: Allocate,
    secret: bytes | None = None,
) -> memoryview | None:
    """Chunk index read into a buffer from allocate (the loader's staged file), after checking
    header, identity and checksum (off the event loop): the filled buffer, or None when it is
    not stored. A corrupt object (or, given the cluster secret, one without its MAC) is
    deleted, then CorruptChunkError; a verified one may be promoted to a nearer tier."""
    data = await store.get_into(prompt.keys[index], allocate)
    if data is None:
        return None
    try:
        await asyncio.to_thread(verify_chunk, data, prompt.identity(index), secret)
    except CorruptChunkError as exc:
        log.warning("corrupt chunk deleted", chunk=index, error=str(exc))
        await store.drop_corrupt(prompt.keys[index])
        raise
    await store.promote(prompt.keys[index], data)
    return data


async def store_missing(
    store: ChunkStore,
    prompt: PromptChunks,
    indices: Sequence[int],
    read: Callable[[int], Awaitable[bytes]],
) -> tuple[int, int]:
    """Store the chunks among indices that the store lacks (read(i) gives chunk i's bytes and
    is called only for those); how many chunks and bytes were written. Stops at the first
    error, since a chunk is only ever found through every chunk before it."""
    present = await store.shared_many([prompt.keys[i] for i in indices])
    chunks = nbytes = 0
    for i, stored in zip(indices, present, strict=True):
        if not stored:
            data = await read(i)
            await store.put(prompt.keys[i], data)
            chunks, nbytes = chunks + 1, nbytes + len(data)
    return chunks, nbytes
