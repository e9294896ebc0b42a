"""Chunking of prompts and the chained cryptographic keys of stored chunks.

A chunk key is sha256(parent key || packed token ids of the chunk). The first parent is a
root digest binding the format version, model fingerprint, KV dtype and layout, chunk size and
tenant salt, so two models, tenants, layouts or chunk sizes can never share a key, and a chunk
computed after a different head can never be mistaken for this one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 2  # 2: BLAKE3 payload digests (2026-12); keys of other versions never meet
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DEFAULT_CHUNK_TOKENS = 256


def pack_tokens(ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (how ids travel and are hashed)."""
    return np.asarray(ids, dtype="<u4").tobytes()


def unpack_tokens(data: bytes) -> list[int]:
    """Inverse of pack_tokens."""
    if len(data) % 4:
        raise ValueError("packed token ids must be a multiple of 4 bytes")
    return np.frombuffer(data, dtype="<u4").tolist()


@dataclass(frozen=True)
class KVLayout:
    """Shape of one token's KV across the model: layers x (key, value) x kv_heads x head_dim."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def tag(self) -> str:
        """Compact text form bound into keys, e.g. 'L8xKV2xH4xD64:float32'."""
        return f"L{self.layers}xKV2xH{self.kv_heads}xD{self.head_dim}:{self.dtype}"

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes across the model."""
        return self.layers * 2 * self.kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Tensor shape of a chunk's KV: (layers, 2, kv_heads, tokens, head_dim)."""
        return (self.layers, 2, self.kv_heads, tokens, self.head_dim)


TENANT_SALT_PREFIX = '["tenant",'  # what only tenant_salt writes (a cache_salt may not start so)


def tenant_salt(tenant: str, cache_salt: str) -> str:
    """The salt a request's chunk keys bind: its cache_salt within its tenant's space. The
    tenant comes from the API key (server-side); without API keys there is one tenant ("") and
    the salt is the cache_salt alone, as it always was."""
    if not tenant:
        return cache_salt
    return json.dumps(["tenant", tenant, cache_salt], separators=(",", ":"))


@dataclass(frozen=True)
class KeySpace:
    """Everything besides the tokens that a chunk key binds."""

    model_fingerprint: str
    layout: KVLayout
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    salt: str = ""

    def __post_init__(self) -> None:
        if self.chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")

    def root(self) -> bytes:
        """The parent digest of chunk 0."""
        fields = {
            "format": FORMAT_VERSION,
            "model": self.model_fingerprint,
            "kv": self.layout.tag,
            "chunk_tokens": self.chunk_tokens,
            "salt": self.salt,
        }
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(b"cake-root\x00" + blob).digest()

    def full_chunks(self, n_tokens: int) -> int:
        """How many complete chunks a prompt of n_tokens holds."""
        return n_tokens // self.chunk_tokens

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """Token range [start, end) of chunk index."""
        return index * self.chunk_tokens, (index + 1) * self.chunk_tokens

    def chunk_keys(self, token_ids: Sequence[int]) -> list[str]:
        """Hex keys of every complete chunk of the prompt, each chained to its parent."""
        parent = self.root()
        keys = []
        for i in range(self.full_chunks(len(token_ids))):
            start, end = self.chunk_bounds(i)
            parent = hashlib.sha256(parent + pack_tokens(token_ids[start:end])).digest()
            keys.append(parent.hex())
        return keys


@dataclass(frozen=True)
class ChunkIdentity:
    """What a reader expects of a stored chunk: reading fails unless every field matches."""

    key: str
    model_fingerprint: str
    layout: KVLayout
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class PromptChunks:
    """A prompt's tokens with its chunk keys under one key space."""

    space: KeySpace
    token_ids: tuple[int, ...]
    keys: tuple[str, ...]

    @classmethod
    def of(cls, space: KeySpace, token_ids: Sequence[int]) -> PromptChunks:
        """Split and key a prompt."""
        ids = tuple(token_ids)
        return cls(space, ids, tuple(space.chunk_keys(ids)))

    def identity(self, index: int) -> ChunkIdentity:
        """What chunk index must be when read back."""
        start, end = self.space.chunk_bounds(index)
        return ChunkIdentity(
            self.keys[index],
            self.space.model_fingerprint,
            self.space.layout,
            self.token_ids[start:end],
        )

    def tokens_of(self, first_chunk: int, last_chunk: int) -> tuple[int, ...]:
        """Tokens of chunks [first_chunk, last_chunk)."""
        c = self.space.chunk_tokens
        return self.token_ids[first_chunk * c : last_chunk * c]
