"""Compute's memory tier: prompt chunks' KV kept in memory by their chained keys.

A chunk's key names its whole prefix (shared.core.keys), so a chunk found here under the key a
prompt asks for is that prompt's KV for that chunk, exactly as storage would return it. Chunks
are kept after their request ends while the KV budget has room (what running requests have not
reserved) and the least recently used go first when it has not; among a prompt's chunks the
deepest go first (`touch`), as in vLLM, since a chunk is useless once its parent is gone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence, Set

import torch


class PrefixPool:
    """Chunk KV tensors (layers, 2, kv_heads, chunk_tokens, head_dim) by chunk key, in LRU order."""

    def __init__(self, on_evict: Callable[[int], object] = lambda n: None) -> None:
        self.chunks: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recent first
        self.bytes = 0
        self.on_evict = on_evict  # told how many chunks each eviction removed

    def __len__(self) -> int:
        return len(self.chunks)

    def __contains__(self, key: str) -> bool:
        return key in self.chunks

    def prefix(self, keys: Sequence[str]) -> int:
        """How many leading chunks of these keys are held."""
        n = 0
        while n < len(keys) and keys[n] in self.chunks:
            n += 1
        return n

    def get(self, key: str) -> torch.Tensor | None:
        """The chunk's KV (now the most recently used), or None."""
        kv = self.chunks.get(key)
        if kv is not None:
            self.chunks.move_to_end(key)
        return kv

    def touch(self, keys: Sequence[str]) -> None:
        """A prompt used these chunks: they become the most recently used, its first chunk last
        of all (so the prompt's tail is evicted before its head)."""
        for key in reversed(keys):
            if key in self.chunks:
                self.chunks.move_to_end(key)

    def put(self, key: str, kv: torch.Tensor, limit_bytes: int) -> bool:
        """Keep a chunk, evicting the least recently used while over limit_bytes; False when it
        cannot fit at all (nothing is evicted then)."""
        if key in self.chunks:
            self.chunks.move_to_end(key)
            return True
        if kv.nbytes > limit_bytes:
            return False
        self.shrink(limit_bytes - kv.nbytes)
        self.chunks[key] = kv
        self.bytes += kv.nbytes
        return True

    def shrink(self, limit_bytes: int, keep: Set[str] = frozenset()) -> None:
        """Evict the least recently used chunks, except those in keep (about to be used),
        until at most limit_bytes are held (or only kept ones are left)."""
        evicted = 0
        for key in list(self.chunks):
            if self.bytes <= limit_bytes:
                break
            if key not in keep:
                self.bytes -= self.chunks.pop(key).nbytes
                evicted += 1
        if evicted:
            self.on_evict(evicted)
