"""Chunk keys: chained, deterministic across processes, bound to everything that matters."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from shared.core.keys import KeySpace, KVLayout, pack_tokens, unpack_tokens

LAYOUT = KVLayout(layers=8, kv_heads=4, head_dim=64, dtype="float32")
SPACE = KeySpace("f" * 64, LAYOUT, chunk_tokens=4)
IDS = list(range(100, 118))  # 4 full chunks of 4 tokens and 2 tokens left over


def test_one_key_per_full_chunk_and_all_distinct() -> None:
    keys = SPACE.chunk_keys(IDS)
    assert len(keys) == 4
    assert len(set(keys)) == 4
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


def test_keys_are_chained_prefixes() -> None:
    assert SPACE.chunk_keys(IDS[:9]) == SPACE.chunk_keys(IDS)[:2]
    changed = IDS.copy()
    changed[0] += 1  # a change in chunk 0 changes every later key
    assert not set(SPACE.chunk_keys(changed)) & set(SPACE.chunk_keys(IDS))


def test_every_bound_field_changes_every_key() -> None:
    base = set(SPACE.chunk_keys(IDS))
    variants = [
        dataclasses.replace(SPACE, model_fingerprint="e" * 64),
        dataclasses.replace(SPACE, layout=dataclasses.replace(LAYOUT, dtype="bfloat16")),
        dataclasses.replace(SPACE, layout=dataclasses.replace(LAYOUT, kv_heads=8)),
        dataclasses.replace(SPACE, salt="tenant-a"),
    ]
    for space in variants:
        assert not set(space.chunk_keys(IDS)) & base, space
    other_chunking = dataclasses.replace(SPACE, chunk_tokens=2).chunk_keys(IDS)
    assert not set(other_chunking) & base


def test_keys_identical_in_a_fresh_process() -> None:
    code = (
        "from shared.core.keys import KeySpace, KVLayout;"
        "s = KeySpace('f' * 64, KVLayout(8, 4, 64, 'float32'), chunk_tokens=4);"
        f"print(','.join(s.chunk_keys({IDS!r})))"
    )
    env = {"PYTHONHASHSEED": "12345"}  # Python's own hash() would change with this
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip().split(",") == SPACE.chunk_keys(IDS)


def test_known_key_vector() -> None:
    """A fixed vector: keys must never change silently between releases."""
    space = KeySpace("0" * 64, KVLayout(1, 1, 2, "float32"), chunk_tokens=2)
    assert space.chunk_keys([1, 2, 3, 4]) == KNOWN_KEYS


def test_token_packing_round_trip() -> None:
    ids = [0, 1, 255, 256, 2**32 - 1]
    assert unpack_tokens(pack_tokens(ids)) == ids
    assert len(pack_tokens(ids)) == 4 * len(ids)


KNOWN_KEYS = [  # format version 2 (BLAKE3 payload digests, 2026-12); version 1's began ed3ef803
    "a3b4deb3917f5641c10c4acf3efb52fe868c25edb186f0190e0756ac043a92fb",
    "f479014b23789f5a6cba3d1f84bd081075175dcca9f4434ba7fed5134a7e3039",
]
