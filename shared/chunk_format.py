"""The stored form of one KV chunk: a small msgpack header, then the raw tensor bytes.

Layout: MAGIC (8 bytes) | header length (uint32, little-endian) | msgpack header | payload.
The header names the format version, chunk key, model fingerprint, dtype, shape
(layers, 2, kv_heads, tokens, head_dim), the packed token ids, the codec and the sha256 of the
payload. Decoding checks every one of them against what the reader expects, so a truncated,
corrupt, foreign-model or wrong-salt object raises CorruptChunkError and is never served.
No pickle: tensors are rebuilt from raw bytes with torch.frombuffer.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from shared.errors import CorruptChunkError
from shared.keys import FORMAT_VERSION, KVLayout, pack_tokens

MAGIC = b"CAKEKV\x00\x01"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20
CODECS = ("raw", "int8")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("Cake's stored format assumes a little-endian host")


def dtype_name(dtype: torch.dtype) -> str:
    """The format's name of a torch dtype (float32, float16, bfloat16)."""
    for name, value in _DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; use one of {sorted(_DTYPES)}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a format dtype name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; use one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ChunkIdentity:
    """What a reader expects of a chunk: decoding fails unless every field matches."""

    key: str
    model_fingerprint: str
    layout: KVLayout
    token_ids: tuple[int, ...]


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _from_bytes(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over the bytes: zero-copy when they are writable, one copy otherwise."""
    buffer = data if not data.readonly else bytearray(data)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _quantize_int8(kv: torch.Tensor) -> bytes:
    """Symmetric 8-bit per token and head: int8 values then float32 scales over head_dim."""
    x = kv.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return _to_bytes(q) + _to_bytes(scale)


def _dequantize_int8(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    q = _from_bytes(view[:n], torch.int8, shape)
    scale = _from_bytes(view[n:], torch.float32, (*shape[:-1], 1))
    return (q.float() * scale).to(dtype)


def encode_chunk(ident: ChunkIdentity, kv: torch.Tensor, codec: str = "raw") -> bytes:
    """Serialize one chunk's KV, shape (layers, 2, kv_heads, tokens, head_dim)."""
    shape = ident.layout.chunk_shape(len(ident.token_ids))
    if tuple(kv.shape) != shape:
        raise ValueError(f"chunk KV has shape {tuple(kv.shape)}, layout expects {shape}")
    if dtype_name(kv.dtype) != ident.layout.dtype:
        raise ValueError(f"chunk KV is {kv.dtype}, layout expects {ident.layout.dtype}")
    if codec == "raw":
        payload = _to_bytes(kv)
    elif codec == "int8":
        payload = _quantize_int8(kv)
    else:
        raise ValueError(f"unknown codec {codec!r}; use one of {CODECS}")
    header = msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "key": ident.key,
            "fp": ident.model_fingerprint,
            "dtype": ident.layout.dtype,
            "shape": list(shape),
            "tokens": pack_tokens(ident.token_ids),
            "codec": codec,
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
    )
    return MAGIC + _LEN.pack(len(header)) + header + payload


def _corrupt(ident: ChunkIdentity, why: str) -> CorruptChunkError:
    return CorruptChunkError(f"chunk {ident.key[:16]}: {why}")


def _read_header(data: bytes | bytearray, ident: ChunkIdentity) -> tuple[dict[str, Any], int]:
    if len(data) < len(MAGIC) + _LEN.size or not data.startswith(MAGIC):
        raise _corrupt(ident, "not a Cake chunk (bad magic or truncated)")
    (hlen,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if hlen > MAX_HEADER_BYTES or start + hlen > len(data):
        raise _corrupt(ident, "truncated header")
    try:
        header = msgpack.unpackb(memoryview(data)[start : start + hlen])
    except (ValueError, msgpack.UnpackException) as exc:
        raise _corrupt(ident, f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise _corrupt(ident, "header is not a map")
    return header, start + hlen


def verify_chunk(data: bytes | bytearray, ident: ChunkIdentity) -> tuple[dict[str, Any], int]:
    """Check every header field and the payload checksum; the header and the payload offset."""
    header, offset = _check_header(data, ident)
    if hashlib.sha256(memoryview(data)[offset:]).hexdigest() != header.get("sha256"):
        raise _corrupt(ident, "payload checksum mismatch (truncated or corrupt)")
    return header, offset


def decode_chunk(
    data: bytes | bytearray, ident: ChunkIdentity, verify_payload: bool = True
) -> torch.Tensor:
    """The chunk's KV tensor, after checking the header and (by default) the payload checksum.

    verify_payload=False is for bytes already verified by verify_chunk in this node (the
    loader's staged files); a bytearray is decoded without a copy.
    """
    if verify_payload:
        header, offset = verify_chunk(data, ident)
    else:
        header, offset = _check_header(data, ident)
    shape = ident.layout.chunk_shape(len(ident.token_ids))
    dtype = torch_dtype(ident.layout.dtype)
    payload = memoryview(data)[offset:]
    codec = header.get("codec")
    try:
        if codec == "raw":
            return _from_bytes(payload, dtype, shape)
        if codec == "int8":
            return _dequantize_int8(payload, dtype, shape)
    except (RuntimeError, ValueError) as exc:  # payload size does not fit the shape
        raise _corrupt(ident, f"payload does not fit shape {shape} ({exc})") from exc
    raise _corrupt(ident, f"unknown codec {codec!r}")


def _check_header(data: bytes | bytearray, ident: ChunkIdentity) -> tuple[dict[str, Any], int]:
    header, offset = _read_header(data, ident)
    expected = {
        "v": FORMAT_VERSION,
        "key": ident.key,
        "fp": ident.model_fingerprint,
        "dtype": ident.layout.dtype,
        "shape": list(ident.layout.chunk_shape(len(ident.token_ids))),
        "tokens": pack_tokens(ident.token_ids),
    }
    for field, want in expected.items():
        if header.get(field) != want:
            raise _corrupt(ident, f"header field {field!r} does not match")
    return header, offset
