"""Stored chunk format: exact round trips, the 8-bit codec's error, and every kind of bad object."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest
import torch
from blake3 import blake3

from shared.core.errors import CorruptChunkError
from shared.core.keys import ChunkIdentity, KeySpace, KVLayout, PromptChunks
from shared.kv.codec import decode_chunk, encode_chunk
from shared.kv.engine import fetch_chunk, write_back
from shared.kv.format import MAGIC
from shared.kv.upload import mover
from shared.storage.memory import MemoryStore
from tests.models import tiny_runner


def identity(dtype: str = "float32", tokens: int = 16) -> ChunkIdentity:
    layout = KVLayout(layers=3, kv_heads=2, head_dim=32, dtype=dtype)
    return ChunkIdentity("ab" * 32, "f" * 64, layout, tuple(range(tokens)))


def random_kv(ident: ChunkIdentity) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    shape = ident.layout.chunk_shape(len(ident.token_ids))
    dtype = getattr(torch, ident.layout.dtype)
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_raw_round_trip_is_bit_exact(dtype: str) -> None:
    ident = identity(dtype)
    kv = random_kv(ident)
    data = encode_chunk(ident, kv)
    assert data.startswith(MAGIC)
    back = decode_chunk(data, ident)
    assert back.dtype == kv.dtype and torch.equal(back, kv)
    assert len(data) - kv.numel() * kv.element_size() < 512  # the header is small


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_int8_codec_halves_bytes_with_bounded_error(dtype: str) -> None:
    ident = identity(dtype)
    kv = random_kv(ident)
    raw = encode_chunk(ident, kv.to(kv.dtype))
    packed = encode_chunk(ident, kv, codec="int8")
    half_precision_bytes = kv.numel() * 2
    assert len(packed) < 0.6 * half_precision_bytes + 512
    assert len(packed) < len(raw)
    back = decode_chunk(packed, ident).float()
    rel = ((back - kv.float()).norm() / kv.float().norm()).item()
    # symmetric 8-bit per token: error ~ absmax/254/sqrt(3) per value; ~0.9 % of the norm here
    assert rel < 0.02, rel
    assert (back - kv.float()).abs().max() <= kv.float().abs().max() / 127 + 1e-2


@pytest.mark.parametrize(
    ("codec", "crossing"), [("raw", [torch.float16]), ("int8", [torch.int8, torch.float32])]
)
def test_a_chunk_crosses_to_the_device_as_stored_and_is_dequantised_there(
    codec: str, crossing: list[torch.dtype]
) -> None:
    """What `move` carries to the compute device: a raw chunk's tensor, or an int8 chunk's int8
    values and float32 scales (dequantised after they land: half of fp16's bytes on the bus);
    the result is the host decode's."""
    ident = identity("float16")
    data = encode_chunk(ident, random_kv(ident), codec=codec)
    moved: list[torch.dtype] = []

    def move(host: torch.Tensor) -> torch.Tensor:
        moved.append(host.dtype)
        return host.clone()  # a copy, as a transfer makes

    on_device = decode_chunk(data, ident, move=move)
    assert moved == crossing
    assert torch.equal(on_device, decode_chunk(data, ident))


def test_on_the_cpu_a_loaded_chunk_is_used_as_it_is() -> None:
    """CPU compute: the tensor over the staged file goes into the slot; no pinned copy."""
    host = torch.arange(6.0)
    assert mover(torch.device("cpu"))(host) is host


def test_shape_and_dtype_mismatch_refused_on_write() -> None:
    ident = identity()
    with pytest.raises(ValueError, match="shape"):
        encode_chunk(ident, torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="layout expects float32"):
        encode_chunk(ident, random_kv(ident).half())


def _reheader(data: bytes, drop: tuple[str, ...] = (), **changes: object) -> bytes:
    hlen = int.from_bytes(data[8:12], "little")
    header = msgpack.unpackb(data[12 : 12 + hlen])
    header.update(changes)
    for name in drop:
        del header[name]
    packed = msgpack.packb(header)
    return data[:8] + len(packed).to_bytes(4, "little") + packed + data[12 + hlen :]


def test_bad_objects_are_detected() -> None:
    ident = identity()
    good = encode_chunk(ident, random_kv(ident))
    flipped = bytearray(good)
    flipped[-100] ^= 0x01
    bad_objects = {
        "empty": b"",
        "garbage": b"\x00" * 64,
        "truncated header": good[:20],
        "truncated payload": good[:-1],
        "one flipped bit": bytes(flipped),
        "extra bytes": good + b"\x00",
        "other key": _reheader(good, key="cd" * 32),
        "other model": _reheader(good, fp="e" * 64),
        "other tokens": encode_chunk(
            dataclasses.replace(ident, token_ids=tuple(range(1, 17))), random_kv(ident)
        ),
        "other version": _reheader(good, v=99),
        "unknown codec": _reheader(good, codec="zstd"),
        "lying checksum and shape": _reheader(good, shape=[3, 2, 2, 8, 32]),
        "a header key that is not text": _reheader(good, **{"mac": "0" * 64}).replace(
            msgpack.packb("mac"), msgpack.packb(b"mac")
        ),
    }
    for what, data in bad_objects.items():
        with pytest.raises(CorruptChunkError):
            decode_chunk(data, ident)
            pytest.fail(what)


async def test_foreign_model_and_wrong_salt_objects_are_misses() -> None:
    """Objects planted under this prompt's keys are rejected, counted as misses and deleted."""
    runner = tiny_runner("llama")
    other_model = tiny_runner("llama", seed=1)
    ids = list(range(40))
    mine = PromptChunks.of(KeySpace(runner.fingerprint, runner.layout, 16, salt="a"), ids)
    cache = runner.new_cache()
    runner.prefill_chunks(cache, ids, 16)
    foreign = {
        "wrong salt": PromptChunks.of(KeySpace(runner.fingerprint, runner.layout, 16, "b"), ids),
        "foreign model": PromptChunks.of(
            KeySpace(other_model.fingerprint, other_model.layout, 16, "a"), ids
        ),
    }
    assert other_model.fingerprint != runner.fingerprint
    for what, theirs in foreign.items():
        source = MemoryStore()
        await write_back(runner, source, theirs, cache)
        store = MemoryStore()
        for i, key in enumerate(mine.keys):  # plant their bytes under my keys
            data = await source.get(theirs.keys[i])
            assert data is not None
            await store.put(key, data)
        assert await fetch_chunk(store, mine, 0) is None, what
        assert not await store.exists(mine.keys[0]), f"{what}: bad object not deleted"
    # a truncated object under the right key is a miss too
    store = MemoryStore()
    await write_back(runner, store, mine, cache)
    good = await fetch_chunk(store, mine, 1)
    assert good is not None and torch.equal(good, runner.chunk_kv(cache, 16, 32))
    data = await store.get(mine.keys[1])
    assert data is not None
    await store.put(mine.keys[1], data[: len(data) // 2])
    assert await fetch_chunk(store, mine, 1) is None


def test_a_chunk_carries_the_blake3_digest_of_its_payload() -> None:
    """The header holds the payload's BLAKE3 digest; a header without it is refused, and so is
    a chunk of format version 1 (sha256 digests), though its keys never name a version-2 chunk."""
    ident = identity()
    data = encode_chunk(ident, random_kv(ident))
    hlen = int.from_bytes(data[8:12], "little")
    header, payload = msgpack.unpackb(data[12 : 12 + hlen]), data[12 + hlen :]
    assert header["blake3"] == blake3(payload).hexdigest() and header["v"] == 2
    with pytest.raises(CorruptChunkError, match="checksum"):
        decode_chunk(_reheader(data, drop=("blake3",)), ident)
    version_1 = _reheader(data, drop=("blake3",), v=1, sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(CorruptChunkError, match="'v'"):
        decode_chunk(version_1, ident)


def test_decoding_verified_bytes_skips_only_the_checksum() -> None:
    ident = identity()
    kv = random_kv(ident)
    data = bytearray(encode_chunk(ident, kv))
    back = decode_chunk(data, ident, verify_payload=False)
    assert torch.equal(back, kv)
    back[0, 0, 0, 0, 0] = 42.0  # zero-copy: the tensor is a view of the bytearray
    assert decode_chunk(data, ident, verify_payload=False)[0, 0, 0, 0, 0] == 42.0
    with pytest.raises(CorruptChunkError, match="checksum"):
        decode_chunk(data, ident)
    with pytest.raises(CorruptChunkError, match="key"):
        decode_chunk(data, dataclasses.replace(ident, key="cd" * 32), verify_payload=False)


def test_a_cluster_secret_refuses_chunks_without_its_mac() -> None:
    """Given CAKE_KV_SECRET, a reader takes only chunks MAC'd with it: a forger who can write
    to the store (and so set any header field and a matching digest) but lacks the secret is
    refused; readers without the secret still read MAC'd chunks."""
    ident, secret = identity(), b"cluster secret"
    kv = random_kv(ident)
    signed = encode_chunk(ident, kv, secret=secret)
    assert torch.equal(decode_chunk(signed, ident, secret=secret), kv)
    assert torch.equal(decode_chunk(signed, ident), kv)
    forged_payload = encode_chunk(ident, torch.zeros_like(kv))  # valid checksum, no MAC
    for what, data in {
        "no mac": forged_payload,
        "another secret": encode_chunk(ident, kv, secret=b"not ours"),
        "mac copied onto other KV": _reheader(
            forged_payload,
            mac=msgpack.unpackb(signed[12 : 12 + int.from_bytes(signed[8:12], "little")])["mac"],
        ),
        "a field changed under the mac": _reheader(signed, codec="int8"),
    }.items():
        with pytest.raises(CorruptChunkError, match="MAC"):
            decode_chunk(data, ident, secret=secret)
            pytest.fail(what)
