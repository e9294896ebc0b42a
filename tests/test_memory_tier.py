"""Compute's memory tier: prompt chunks reused from memory, shared by requests in flight, kept
within the KV budget, bypassed by kv_mode compute and load, separate per salt."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from services.compute.service import Compute
from shared.kv.pool import PrefixPool
from shared.storage.local import LocalStore
from tests.harness import Backend, backend, default_runner, stack_settings
from tests.prom import value

CHUNK = 64  # the harness's chunk_tokens


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(256) for _ in range(n - 1)]


@pytest.fixture
async def tiered(nats_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    settings = stack_settings(nats_url, tmp_path, memory_tier=True)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        yield be


def compute_of(be: Backend) -> Compute:
    compute = be.services["compute"]
    assert isinstance(compute, Compute)
    return compute


async def test_a_repeated_prompt_reuses_its_chunks_from_memory(tiered: Backend) -> None:
    tokens = prompt(700, seed=1)  # 10 complete chunks, all usable (the last token computes)
    ref = await tiered.generate(tokens, kv_mode="compute")
    first = await tiered.generate(tokens, salt="tier")
    again = await tiered.generate(tokens, salt="tier")
    assert again.tokens == first.tokens == ref.tokens
    assert first.done.reused_tokens == 0
    d = again.done
    assert (d.reused_tokens, d.loaded_tokens, d.computed_tokens) == (10 * CHUNK, 0, 0)
    assert d.chunks_computed == 1  # the suffix: 60 tokens
    merger = tiered.services["merger"].metrics.registry  # type: ignore[attr-defined]
    assert value(merger, "cake_merger_requests_total", kv_mode="cake", outcome="memory") == 1
    registry = compute_of(tiered).metrics.registry
    assert value(registry, "cake_compute_reused_chunks_total") == 10
    assert value(registry, "cake_compute_memory_tier_chunks") == 10


async def test_a_longer_prompt_reuses_the_prefix_and_computes_the_rest(tiered: Backend) -> None:
    base = prompt(400, seed=2)  # 6 complete chunks
    longer = base + prompt(300, seed=3)  # 10 complete chunks; the first 6 shared
    ref = await tiered.generate(longer, kv_mode="compute", salt="ref")
    await tiered.generate(base, kv_mode="cake", salt="a")
    got = await tiered.generate(longer, kv_mode="cake", salt="a")
    assert got.tokens == ref.tokens
    assert got.done.reused_tokens == 6 * CHUNK


async def test_requests_in_flight_with_a_common_prefix_compute_it_once(tiered: Backend) -> None:
    prefix = prompt(640, seed=4)  # 10 chunks
    prompts = [prefix + prompt(100, seed=10 + i)[1:] for i in range(4)]
    refs = [await tiered.generate(p, kv_mode="compute", salt="ref") for p in prompts]
    got = await asyncio.gather(*(tiered.generate(p, salt="together") for p in prompts))
    assert [g.tokens for g in got] == [r.tokens for r in refs]
    reused = sorted(g.done.reused_tokens for g in got)
    assert reused == [0] + [10 * CHUNK] * 3  # the first computed the prefix; three joined it


async def test_compute_and_load_modes_bypass_the_tier(tiered: Backend) -> None:
    tokens = prompt(500, seed=5)
    await tiered.generate(tokens, salt="b")  # in memory now, and written back
    for mode in ("compute", "load"):
        got = await tiered.generate(tokens, kv_mode=mode, salt="b")
        assert got.done.reused_tokens == 0
    assert (await tiered.generate(tokens, salt="b")).done.reused_tokens == 7 * CHUNK


async def test_salts_do_not_share_the_tier(tiered: Backend) -> None:
    tokens = prompt(500, seed=6)
    await tiered.generate(tokens, salt="tenant-a")
    assert (await tiered.generate(tokens, salt="tenant-b")).done.reused_tokens == 0
    assert (await tiered.generate(tokens, salt="tenant-a")).done.reused_tokens == 7 * CHUNK


async def test_the_tier_gives_way_to_running_requests(nats_url: str, tmp_path: Path) -> None:
    """With room for about two requests, the tier holds what running requests leave free and
    evicts least recently used chunks (a prompt's tail before its head) to admit new ones."""
    budget = int(2.5 * (700 + 8) * default_runner().layout.bytes_per_token)
    settings = stack_settings(nats_url, tmp_path, memory_tier=True, kv_memory_gb=budget / 2**30)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        compute = compute_of(be)
        seen: list[int] = []
        prompts = [prompt(700, seed=20 + i) for i in range(4)]
        for p in prompts:
            await be.generate(p, salt="lru")
            seen.append(compute.pool.bytes)  # type: ignore[union-attr]
        assert max(seen) <= compute.admission.budget_bytes
        assert value(compute.metrics.registry, "cake_compute_evicted_chunks_total") > 0
        newest = await be.generate(prompts[-1], salt="lru")
        assert newest.done.reused_tokens > 0  # the newest prompt's head is still there
        oldest = await be.generate(prompts[0], salt="lru")
        assert oldest.done.reused_tokens == 0  # the oldest went first


def chunk(fill: float) -> torch.Tensor:
    return torch.full((2, 2, 1, 4, 2), fill)  # 128 bytes


def test_pool_counts_prefixes_and_evicts_least_recent_first() -> None:
    evicted: list[int] = []
    pool = PrefixPool(on_evict=evicted.append)
    for key in "abc":
        assert pool.put(key, chunk(1.0), limit_bytes=1024)
    assert (pool.prefix(["a", "b", "x", "c"]), pool.bytes, len(pool)) == (2, 384, 3)
    pool.touch(["a", "b", "c"])  # a prompt used them: its head is evicted last
    pool.shrink(256)
    assert evicted == [1] and "c" not in pool
    assert pool.get("b") is not None  # b is now the most recent
    assert pool.put("d", chunk(2.0), limit_bytes=256) and list(pool.chunks) == ["b", "d"]
    assert evicted == [1, 1]


def test_pool_refuses_a_chunk_larger_than_its_room_and_evicts_nothing() -> None:
    pool = PrefixPool()
    pool.put("a", chunk(1.0), limit_bytes=1024)
    assert not pool.put("b", chunk(1.0), limit_bytes=100)
    assert list(pool.chunks) == ["a"] and pool.bytes == 128
    assert pool.put("a", chunk(3.0), limit_bytes=0)  # held already: only touched
    assert float(pool.chunks["a"][0, 0, 0, 0, 0]) == 1.0


def test_a_request_waiting_for_chunks_another_merges_takes_them_in_the_same_step(
    tmp_path: Path,
) -> None:
    """The memory tier's copies wait for the end of a step (off the first token's path), except
    when a merge fills chunks another request waits for: then they land before that request is
    planned, and it takes them instead of computing them again."""
    import time

    from services.compute.job import Job
    from shared.core.keys import KeySpace, PromptChunks, pack_tokens
    from shared.core.request import Sampling
    from shared.storage.staging import Staging
    from shared.wire.messages import PrefillJob, Space

    runner = default_runner()
    settings = stack_settings("nats://127.0.0.1:1", tmp_path, memory_tier=True)
    compute = Compute(None, runner, Staging(str(tmp_path / "staging")), settings)  # type: ignore[arg-type]
    space = KeySpace(runner.fingerprint, runner.layout, CHUNK)
    tokens = prompt(CHUNK * 6 + 10, seed=90)  # 6 complete chunks
    chunks = PromptChunks.of(space, tokens)

    def job(rid: str, hit: int, fetched: bool) -> Job:
        msg = PrefillJob(
            rid, pack_tokens(tokens), Space.of(space), hit, True, Sampling(max_tokens=4),
            time.time() + 60, fetched=fetched,
        )  # fmt: skip
        new = Job(msg, chunks, frozenset(), None, piece=2 * CHUNK, memory=True)
        compute.admission.offer(rid, new.capacity * space.layout.bytes_per_token)
        compute.admit(new)
        return new

    loading, waiting = job("loading", 4, True), job("waiting", 0, False)
    waiting.meet = waiting.hit
    compute.jobs = {"loading": loading, "waiting": waiting}
    compute.prepare()
    assert waiting.blocked  # "loading" will fill chunks 0-3
    slot = loading.cache
    assert slot is not None
    for j in range(4):  # its loads land in its slot, and its meeting point is chunk 0
        slot.place(j * CHUNK, slot.kv[:, :, :, :CHUNK].clone().zero_())  # type: ignore[union-attr]
        loading.placed.add(j)
    loading.meet = 0
    compute.prepare()  # merges them, and "waiting" is planned next
    assert loading.merged
    assert sorted(waiting.reused) == [0, 1, 2, 3] and waiting.candidate().tokens == 0
    assert compute.to_remember == []
