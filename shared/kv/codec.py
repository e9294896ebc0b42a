"""KV tensors to stored chunks and back (the payload codecs of shared.kv.format).

Codec `raw` stores the tensor's bytes as they are (exact); `int8` stores int8 values with one
float32 scale per token and head (about half of fp16's bytes, lossy). No pickle: tensors are
rebuilt from raw bytes with torch.frombuffer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from shared.core.keys import ChunkIdentity
from shared.kv.format import CODECS, Buffer, check_header, corrupt, pack_chunk, verify_chunk

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


Move = Callable[[torch.Tensor], torch.Tensor]  # a host tensor onto the compute device


def _int8_parts(view: memoryview, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """An int8 payload's values and scales, as host tensors over its bytes."""
    n = 1
    for s in shape:
        n *= s
    q = _from_bytes(view[:n], torch.int8, shape)
    return [q, _from_bytes(view[n:], torch.float32, (*shape[:-1], 1))]


def encode_chunk(
    ident: ChunkIdentity, kv: torch.Tensor, codec: str = "raw", secret: bytes | None = None
) -> bytes:
    """Serialize one chunk's KV, shape (layers, 2, kv_heads, tokens, head_dim) (MAC'd under
    the cluster secret, if any)."""
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
    return pack_chunk(ident, codec, payload, secret)


def decode_chunk(
    data: Buffer,
    ident: ChunkIdentity,
    verify_payload: bool = True,
    secret: bytes | None = None,
    move: Move | None = None,
) -> torch.Tensor:
    """The chunk's KV tensor, after checking the header (with the MAC, given the cluster's
    secret) and (by default) the payload checksum.

    verify_payload=False is for bytes already verified by verify_chunk in this node (the
    loader's staged files); a writable buffer (a bytearray, a copy-on-write mapping) is decoded
    without a copy. `move` takes the payload's tensors onto the compute device (an int8
    payload is dequantised there); without it the tensor stays on the host.
    """
    if verify_payload:
        header, offset = verify_chunk(data, ident, secret)
    else:
        header, offset = check_header(data, ident, secret)
    shape = ident.layout.chunk_shape(len(ident.token_ids))
    dtype = torch_dtype(ident.layout.dtype)
    payload = memoryview(data)[offset:]
    codec = header.get("codec")
    if codec not in CODECS:
        raise corrupt(ident, f"unknown codec {codec!r}")
    try:
        parts = (
            [_from_bytes(payload, dtype, shape)] if codec == "raw" else _int8_parts(payload, shape)
        )
    except (RuntimeError, ValueError) as exc:  # payload size does not fit the shape
        raise corrupt(ident, f"payload does not fit shape {shape} ({exc})") from exc
    if move is not None:  # int8 crosses as int8 and is dequantised where it lands
        parts = [move(part) for part in parts]
    return parts[0] if codec == "raw" else (parts[0].float() * parts[1]).to(dtype)
