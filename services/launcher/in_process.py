"""The whole Cake plan in one process, without NATS: the pipeline's baseline and a library API.

Head chunks are computed in a worker thread while asyncio tasks load the hit chunks tail
first; the MeetTracker decides where they meet, exactly as the merger does over NATS.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import torch

from shared.core.errors import StoreError
from shared.core.estimator import Advice
from shared.core.keys import PromptChunks
from shared.core.plan import MeetTracker, Split, head_step
from shared.core.request import Sampling
from shared.kv.engine import fetch_chunk, merged_prefill
from shared.kv.model import ModelRunner
from shared.storage.base import ChunkStore


@dataclass(frozen=True)
class LocalResult:
    """What one in-process Cake prefill did."""

    first_token: int
    ttft_s: float
    split: Split


async def cake_prefill(
    runner: ModelRunner,
    store: ChunkStore,
    prompt: PromptChunks,
    hit: int,
    fetch_concurrency: int = 4,
    sampling: Sampling | None = None,
    advice: Advice | None = None,
    head_tokens: int = 512,
    budget_tokens: int = 4096,
    fetch_timeout_s: float = 30.0,
) -> LocalResult:
    """Compute the head and load the tail of the hit at once; the first token and its time.

    Head steps follow the same rule as the compute service (shared.core.plan.head_step), with the
    estimator's advice when given. A chunk that fails or stalls past fetch_timeout_s is
    computed instead.
    """
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    advice = advice or Advice()
    tracker = MeetTracker(hit, compute_head=advice.compute_head)
    chunk = prompt.space.chunk_tokens
    step, max_step = max(1, head_tokens // chunk), max(1, budget_tokens // chunk)
    met = asyncio.Event()
    stop = threading.Event()
    loaded: dict[int, torch.Tensor] = {}
    cache = runner.new_cache()

    def on_progress(computed: int | None = None) -> None:
        if computed is not None:
            tracker.on_computed(computed)
        if tracker.meet() is not None:
            met.set()

    def compute_head() -> int:
        done = 0
        while advice.compute_head and done < tracker.load_frontier and not stop.is_set():
            n = head_step(done, hit, tracker.load_frontier, advice.head_hint, step, max_step)
            runner.extend(cache, prompt.tokens_of(done, done + n))
            done += n
            loop.call_soon_threadsafe(on_progress, done)
        return done

    queue = list(range(hit - 1, -1, -1))

    async def load_worker() -> None:
        while queue and not met.is_set():
            j = queue.pop(0)
            try:
                kv = await asyncio.wait_for(fetch_chunk(store, prompt, j), fetch_timeout_s)
            except (TimeoutError, StoreError):
                kv = None
            if kv is None:
                tracker.on_failed(j)
            else:
                loaded[j] = kv
                tracker.on_loaded(j)
            on_progress()

    on_progress()
    head = asyncio.ensure_future(asyncio.to_thread(compute_head))
    workers = [asyncio.ensure_future(load_worker()) for _ in range(max(1, fetch_concurrency))]
    waiting = asyncio.ensure_future(met.wait())
    await asyncio.wait({waiting, head}, return_when=asyncio.FIRST_COMPLETED)
    if head.done() and head.exception() is not None:  # the model failed: stop the loads
        waiting.cancel()
        for w in workers:
            w.cancel()
        await asyncio.gather(waiting, *workers, return_exceptions=True)
        raise head.exception()  # type: ignore[misc]
    await waiting
    stop.set()
    done = await head
    for w in workers:
        w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    split = tracker.meet()
    assert split is not None
    split = Split(max(done, split.meet), hit)
    if any(j not in loaded for j in split.loaded):  # a load failed below the meeting point
        split = Split(hit, hit)
    sampling = sampling or Sampling(max_tokens=1)

    def finish() -> int:
        c, logits = merged_prefill(runner, prompt, split, loaded, cache=cache)
        return next(runner.generate(c, logits, sampling))

    first = await asyncio.to_thread(finish)
    return LocalResult(first, time.perf_counter() - start, split)
