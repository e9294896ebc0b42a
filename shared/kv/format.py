"""The stored form of one KV chunk, without tensors: header, checksum and verification.

Layout: MAGIC (8 bytes) | header length (uint32, little-endian) | msgpack header | payload.
The header names the format version, chunk key, model fingerprint, dtype, shape
(layers, 2, kv_heads, tokens, head_dim), the packed token ids, the codec and the sha256 of the
payload. Reading checks every one of them against what the reader expects, so a truncated,
corrupt, foreign-model or wrong-salt object raises CorruptChunkError and is never served.
The loader verifies chunks with this module alone (no torch); shared.kv.codec turns payloads
into tensors and back.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

from shared.core.errors import CorruptChunkError
from shared.core.keys import FORMAT_VERSION, ChunkIdentity, pack_tokens

MAGIC = b"CAKEKV\x00\x01"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
CODECS = ("raw", "int8")


def identity_fields(ident: ChunkIdentity) -> dict[str, Any]:
    """The header fields that say which chunk this is (a reader checks every one)."""
    return {
        "v": FORMAT_VERSION,
        "key": ident.key,
        "fp": ident.model_fingerprint,
        "dtype": ident.layout.dtype,
        "shape": list(ident.layout.chunk_shape(len(ident.token_ids))),
        "tokens": pack_tokens(ident.token_ids),
    }


def pack_chunk(ident: ChunkIdentity, codec: str, payload: bytes) -> bytes:
    """The stored object: magic, header (with the payload's checksum), payload."""
    checksum = hashlib.sha256(payload).hexdigest()
    header = msgpack.packb({**identity_fields(ident), "codec": codec, "sha256": checksum})
    return MAGIC + _LEN.pack(len(header)) + header + payload


def corrupt(ident: ChunkIdentity, why: str) -> CorruptChunkError:
    """The error for a chunk that is not what the reader expects."""
    return CorruptChunkError(f"chunk {ident.key[:16]}: {why}")


Buffer = bytes | bytearray | memoryview


def _read_header(data: Buffer, ident: ChunkIdentity) -> tuple[dict[str, Any], int]:
    if len(data) < len(MAGIC) + _LEN.size or bytes(data[: len(MAGIC)]) != MAGIC:
        raise corrupt(ident, "not a Cake chunk (bad magic or truncated)")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise corrupt(ident, "truncated header")
    try:
        header = msgpack.unpackb(memoryview(data)[start : start + hlen])
    except (ValueError, msgpack.UnpackException) as exc:
        raise corrupt(ident, f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt(ident, "header is not a map")
    return header, start + hlen


def verify_chunk(data: Buffer, ident: ChunkIdentity) -> tuple[dict[str, Any], int]:
    """Check every header field and the payload checksum; the header and the payload offset."""
    header, offset = check_header(data, ident)
    if hashlib.sha256(memoryview(data)[offset:]).hexdigest() != header.get("sha256"):
        raise corrupt(ident, "payload checksum mismatch (truncated or corrupt)")
    return header, offset


def check_header(data: Buffer, ident: ChunkIdentity) -> tuple[dict[str, Any], int]:
    """Check every header field (not the payload); the header and the payload offset."""
    header, offset = _read_header(data, ident)
    for field, want in identity_fields(ident).items():
        if header.get(field) != want:
            raise corrupt(ident, f"header field {field!r} does not match")
    return header, offset
