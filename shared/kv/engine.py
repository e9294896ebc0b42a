"""The KV side of the protocol steps: chunks of a cache to stored bytes and back.

The compute service encodes write-backs with encode_chunk_at; fetch_chunk and write_back are the
loader's byte steps (shared.kv.stored) with tensors on top, and merged_prefill is the whole
plan in one call (exactness tests, the benchmark's per-chunk profiles).
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
import torch

from shared.core.errors import CorruptChunkError
from shared.core.keys import PromptChunks
from shared.core.plan import Split, usable_hit_chunks
from shared.kv.codec import decode_chunk, encode_chunk
from shared.kv.model import ModelRunner
from shared.kv.slots import KVCache
from shared.kv.stored import read_verified, store_missing
from shared.storage.base import ChunkStore, new_buffer

log = structlog.get_logger(__name__)


async def lookup_hit(store: ChunkStore, prompt: PromptChunks) -> int:
    """Usable hit chunks: the stored prefix, keeping the last prompt token for compute."""
    stored = await store.stored_prefix(prompt.keys)
    return usable_hit_chunks(stored, len(prompt.token_ids), prompt.space.chunk_tokens)


async def fetch_chunk(
    store: ChunkStore, prompt: PromptChunks, index: int, secret: bytes | None = None
) -> torch.Tensor | None:
    """Chunk index's KV, or None when missing or corrupt (a corrupt object is deleted)."""
    try:
        data = await read_verified(store, prompt, index, new_buffer, secret)
    except CorruptChunkError:
        return None
    return None if data is None else decode_chunk(data, prompt.identity(index), False)


def encode_chunk_at(
    runner: ModelRunner,
    cache: KVCache,
    prompt: PromptChunks,
    index: int,
    codec: str,
    secret: bytes | None = None,
) -> bytes:
    """The stored form of chunk index, taken from the cache."""
    start, end = prompt.space.chunk_bounds(index)
    kv = runner.chunk_kv(cache, start, end)
    return encode_chunk(prompt.identity(index), kv, codec, secret)


async def write_back(
    runner: ModelRunner,
    store: ChunkStore,
    prompt: PromptChunks,
    cache: KVCache,
    first_chunk: int = 0,
    codec: str = "raw",
) -> int:
    """Store the complete chunks from first_chunk on that the cache holds; how many were new."""
    held = runner.cache_length(cache) // prompt.space.chunk_tokens
    indices = range(first_chunk, min(held, len(prompt.keys)))

    async def encode(i: int) -> bytes:
        return encode_chunk_at(runner, cache, prompt, i, codec)

    chunks, _ = await store_missing(store, prompt, indices, encode)
    return chunks


def merged_prefill(
    runner: ModelRunner,
    prompt: PromptChunks,
    split: Split,
    loaded: Mapping[int, torch.Tensor],
    cache: KVCache | None = None,
) -> tuple[KVCache, torch.Tensor]:
    """Computed head [0, meet) + loaded tail [meet, hit) + prefilled suffix; the last logits.

    cache may already hold some computed head chunks (the compute service fills it as it goes);
    the rest of the head is computed here.
    """
    chunk = prompt.space.chunk_tokens
    cache = cache if cache is not None else runner.new_cache()
    done = runner.cache_length(cache) // chunk
    if done > split.meet and split.loaded:
        raise ValueError(f"cache holds {done} chunks, past the meeting point {split.meet}")
    runner.prefill_chunks(cache, prompt.tokens_of(done, split.meet), chunk)
    runner.append_kv(cache, [loaded[j] for j in split.loaded])
    logits = runner.prefill_chunks(cache, prompt.token_ids[runner.cache_length(cache) :], chunk)
    assert logits is not None  # the suffix always holds at least the last prompt token
    return cache, logits
