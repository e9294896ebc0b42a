"""Cake in one process: same first token as compute-only; the split follows the bandwidth."""

from __future__ import annotations

import random

from services.launcher.in_process import cake_prefill
from shared.core.keys import KeySpace, PromptChunks
from shared.kv.engine import lookup_hit, write_back
from shared.storage.memory import MemoryStore
from shared.storage.throttled import ThrottledStore
from tests.models import tiny_runner


async def test_split_follows_storage_speed() -> None:
    runner = tiny_runner("llama")
    rng = random.Random(0)
    ids = [rng.randrange(256) for _ in range(1000)]
    prompt = PromptChunks.of(KeySpace(runner.fingerprint, runner.layout, 32), ids)
    cache = runner.new_cache()
    want = int(runner.prefill_chunks(cache, ids, 32).argmax())  # type: ignore[union-attr]
    store = MemoryStore()
    await write_back(runner, store, prompt, cache)
    hit = await lookup_hit(store, prompt)
    assert hit == 31

    fast = await cake_prefill(runner, store, prompt, hit)
    chunk_bytes = len(await store.get(prompt.keys[0]) or b"")
    slow_store = ThrottledStore(store, bandwidth_MBps=chunk_bytes / 1e6 / 0.5)  # 0.5 s a chunk
    async with slow_store:
        slow = await cake_prefill(runner, slow_store, prompt, hit)
    assert fast.first_token == slow.first_token == want
    assert fast.split.meet < slow.split.meet
    assert slow.split.meet >= 20  # a tiny model computes far more than 2 chunks a second
    assert slow.ttft_s < 31 * 0.5  # far faster than loading everything
