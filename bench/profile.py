"""In-process profiles for the oracle (head compute cost, per-chunk load cost, finish cost),
and the measured best split: each meeting point run with both sides at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from shared.core.keys import PromptChunks
from shared.core.plan import Split, oracle_split
from shared.core.request import Sampling
from shared.kv.engine import fetch_chunk, merged_prefill
from shared.kv.model import ModelRunner
from shared.storage.base import ChunkStore

HEAD_SAMPLES = 8  # head lengths measured; the rest is interpolated


@dataclass(frozen=True)
class Profile:
    """Measured costs of one prompt's hit chunks (seconds)."""

    head_s: list[float]  # head_s[m]: computing chunks [0, m) in one pass (m = 0..hit)
    read_s: list[float]  # chunk i read and validated from the unthrottled store
    chunk_bytes: list[int]
    finish_s: float  # append every hit chunk, prefill the suffix, pick the first token

    @property
    def compute_s(self) -> list[float]:
        """Marginal cost of each head chunk (differences of head_s)."""
        return [b - a for a, b in zip(self.head_s, self.head_s[1:], strict=False)]

    def load_s(self, bandwidth_mbps: float, concurrency: int) -> list[float]:
        """Per-chunk load time on a link of bandwidth_mbps: transfer, or reading if slower."""
        return [
            max(n / (bandwidth_mbps * 1e6), r / concurrency)
            for n, r in zip(self.chunk_bytes, self.read_s, strict=True)
        ]

    def load_latency(self, load_only_s: float, bandwidth_mbps: float, fixed_s: float) -> float:
        """What the real load path adds before its first chunk (lookup, dispatch, first byte,
        staging), as the measured load-only TTFT exceeds transfer + finish + fixed cost."""
        transfer = sum(self.load_s(bandwidth_mbps, 1))
        return max(0.0, load_only_s - transfer - self.finish_s - fixed_s)

    def oracle(
        self, bandwidth_mbps: float, concurrency: int, fixed_s: float, load_latency_s: float = 0.0
    ) -> tuple[int, float]:
        """Best meeting chunk and its TTFT: best split (the load side starting after its
        latency) + finish + the pipeline's fixed cost."""
        loads = self.load_s(bandwidth_mbps, concurrency)
        meet, split_s = oracle_split(self.compute_s, loads, load_latency_s)
        return meet, split_s + self.finish_s + fixed_s


async def measure_profile(
    runner: ModelRunner, store: ChunkStore, prompt: PromptChunks, hit: int
) -> Profile:
    """Time heads of several lengths in one pass each, read each chunk, time the finish."""
    points = sorted({round(hit * k / HEAD_SAMPLES) for k in range(HEAD_SAMPLES + 1)})
    measured = []
    for m in points:
        start = time.perf_counter()
        if m:
            runner.extend(runner.new_cache(), prompt.tokens_of(0, m))
        measured.append(time.perf_counter() - start if m else 0.0)
    head_s = np.interp(np.arange(hit + 1), points, measured).tolist()
    read_s, sizes, loaded = [], [], {}
    for j in range(hit):
        start = time.perf_counter()
        kv = await fetch_chunk(store, prompt, j)
        read_s.append(time.perf_counter() - start)
        data = await store.get(prompt.keys[j])
        if data is None or kv is None:
            raise RuntimeError(f"chunk {j} of the benchmark prompt is not stored")
        sizes.append(len(data))
        loaded[j] = kv
    start = time.perf_counter()
    cache, logits = merged_prefill(runner, prompt, Split(0, hit), loaded)
    next(runner.generate(cache, logits, Sampling(max_tokens=1)))
    return Profile(head_s, read_s, sizes, time.perf_counter() - start)


async def time_split(
    runner: ModelRunner, link: ChunkStore, prompt: PromptChunks, split: Split, concurrency: int
) -> float:
    """Seconds to the first token with the head [0, meet) computed (one pass, in a thread)
    while the tail [meet, hit) is read over link (`concurrency` reads at once), both at once in
    this process, then merged with the suffix prefilled."""
    reads = asyncio.Semaphore(concurrency)

    async def load(j: int) -> tuple[int, torch.Tensor]:
        async with reads:
            kv = await fetch_chunk(link, prompt, j)
        if kv is None:
            raise RuntimeError(f"chunk {j} of the benchmark prompt is not stored")
        return j, kv

    start = time.perf_counter()
    cache = runner.new_cache()
    head = asyncio.to_thread(runner.extend, cache, prompt.tokens_of(0, split.meet))
    loads = asyncio.gather(*(load(j) for j in split.loaded))
    if split.meet:
        await head
    else:
        head.close()  # nothing to compute
    loaded = dict(await loads)
    cache, logits = merged_prefill(runner, prompt, split, loaded, cache)
    next(runner.generate(cache, logits, Sampling(max_tokens=1)))
    return time.perf_counter() - start


async def best_split(
    runner: ModelRunner,
    link: ChunkStore,
    prompt: PromptChunks,
    hit: int,
    meets: Iterable[int],
    concurrency: int,
    before_each: Callable[[], None],
) -> tuple[int, float, dict[int, float]]:
    """The fastest of these meeting points as time_split measures them (before_each: e.g.
    drop the page cache): its meet, its seconds, and every meet's seconds."""
    measured = {}
    for meet in sorted(set(meets)):
        before_each()
        measured[meet] = await time_split(runner, link, prompt, Split(meet, hit), concurrency)
    meet = min(measured, key=measured.__getitem__)
    return meet, measured[meet], measured
