"""Cake in one process (the same services over the in-process bus): same tokens as
compute-only; the meeting point follows the storage's speed."""

from __future__ import annotations

import random
from pathlib import Path

from services.launcher.in_process import generate, in_process
from shared.runtime.config import Settings
from shared.storage.memory import MemoryStore
from shared.storage.throttled import ThrottledStore
from tests.models import tiny_runner


async def test_split_follows_storage_speed(tmp_path: Path) -> None:
    runner = tiny_runner("llama")
    rng = random.Random(0)
    ids = [rng.randrange(256) for _ in range(1000)]
    settings = Settings(
        chunk_tokens=32,
        token_budget=1024,
        staging_dir=str(tmp_path),
        node="in-process",
        request_timeout_s=60.0,  # a stuck request fails with its reason, before pytest's timeout
    ).validated()
    store = MemoryStore()
    async with in_process(settings, runner, store) as client:
        reference = await generate(client, settings, ids, kv_mode="compute", max_tokens=4)
        assert reference.done.hit_tokens == 0  # and its 31 complete chunks were written back
        fast = await generate(client, settings, ids, max_tokens=4)
    chunk_bytes = store.usage_bytes() / 31
    slow_store = ThrottledStore(store, bandwidth_MBps=chunk_bytes / 1e6 / 0.5)  # 0.5 s a chunk
    async with slow_store, in_process(settings, runner, slow_store) as client:
        slow = await generate(client, settings, ids, max_tokens=4)
    assert fast.tokens == slow.tokens == reference.tokens
    assert fast.done.hit_tokens == slow.done.hit_tokens == 31 * 32
    assert fast.done.meet_chunk < slow.done.meet_chunk
    assert slow.done.meet_chunk >= 20  # a tiny model computes far more than 2 chunks a second
    assert slow.elapsed_s < 31 * 0.5  # far faster than loading everything
