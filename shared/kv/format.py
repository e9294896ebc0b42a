"""The stored form of one KV chunk, without tensors: header, checksum and verification.

Layout: MAGIC (8 bytes) | header length (uint32, little-endian) | msgpack header | payload.
The header names the format version, chunk key, model fingerprint, dtype, shape
(layers, 2, kv_heads, tokens, head_dim), the packed token ids, the codec and the BLAKE3 digest
of the payload. Reading checks every one of them against what the reader expects, so a
truncated, corrupt, foreign-model or wrong-salt object raises CorruptChunkError and is never
served. BLAKE3 (a cryptographic hash) runs at about 7.5 GB/s on one core here against sha256's
1.9 GB/s, and verifying every loaded byte is the load path's largest cost. Format version 1 had
sha256 digests; the version is part of every key, so chunks of either version are never looked
up by the other (an older loader sharing the store cannot take new chunks for corrupt).

With a cluster secret (CAKE_KV_SECRET) the header also carries `mac`, an HMAC-SHA256 under the
secret of every other header field (the payload's digest among them), and readers with the
secret refuse a chunk whose MAC is missing or wrong: a party that can write to the store but
does not hold the secret cannot plant KV that passes. It costs one HMAC over a few hundred
header bytes, nothing per payload byte.
The loader verifies chunks with this module alone (no torch); shared.kv.codec turns payloads
into tensors and back.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any

import msgpack
from blake3 import blake3

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


def mac(fields: dict[str, Any], secret: bytes) -> str:
    """HMAC-SHA256 under the secret of the header fields other than `mac`, canonically packed."""
    signed = {k: v for k, v in sorted(fields.items()) if k != "mac"}
    return hmac.new(secret, msgpack.packb(signed), hashlib.sha256).hexdigest()


def pack_chunk(ident: ChunkIdentity, codec: str, payload: bytes, secret: bytes | None) -> bytes:
    """The stored object: magic, header (with the payload's digest, and its MAC under the
    cluster secret when there is one), payload."""
    fields = {**identity_fields(ident), "codec": codec, "blake3": blake3(payload).hexdigest()}
    if secret is not None:
        fields["mac"] = mac(fields, secret)
    header = msgpack.packb(fields)
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
    if not isinstance(header, dict) or not all(isinstance(k, str) for k in header):
        raise corrupt(ident, "header is not a map of names")
    return header, start + hlen


def verify_chunk(
    data: Buffer, ident: ChunkIdentity, secret: bytes | None
) -> tuple[dict[str, Any], int]:
    """Check every header field and the payload's digest; the header and the payload offset."""
    header, offset = check_header(data, ident, secret)
    if blake3(memoryview(data)[offset:]).hexdigest() != header.get("blake3"):
        raise corrupt(ident, "payload checksum mismatch (truncated or corrupt)")
    return header, offset


def check_header(
    data: Buffer, ident: ChunkIdentity, secret: bytes | None
) -> tuple[dict[str, Any], int]:
    """Check every header field and, with a secret, the MAC (not the payload); the header and
    the payload offset."""
    header, offset = _read_header(data, ident)
    for field, want in identity_fields(ident).items():
        if header.get(field) != want:
            raise corrupt(ident, f"header field {field!r} does not match")
    if secret is not None:
        given = header.get("mac")
        if not isinstance(given, str) or not hmac.compare_digest(given, mac(header, secret)):
            raise corrupt(ident, "MAC missing or wrong: not written with this cluster's secret")
    return header, offset
