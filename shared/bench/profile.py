"""In-process profiles for the oracle: per-chunk compute and load costs, merge and suffix cost."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.engine import PromptChunks, fetch_chunk, merged_prefill
from shared.model import ModelRunner, SamplingParams
from shared.plan import Split, oracle_split
from shared.stores.base import ChunkStore


@dataclass(frozen=True)
class Profile:
    """Measured costs of one prompt's hit chunks (seconds)."""

    compute_s: list[float]  # chunk i computed after chunks [0, i)
    read_s: list[float]  # chunk i read and validated from the unthrottled store
    chunk_bytes: list[int]
    finish_s: float  # append every hit chunk, prefill the suffix, pick the first token

    def load_s(self, bandwidth_mbps: float, concurrency: int) -> list[float]:
        """Per-chunk load time on a link of bandwidth_mbps: transfer, or reading if slower."""
        return [
            max(n / (bandwidth_mbps * 1e6), r / concurrency)
            for n, r in zip(self.chunk_bytes, self.read_s, strict=True)
        ]

    def oracle(self, bandwidth_mbps: float, concurrency: int, fixed_s: float) -> tuple[int, float]:
        """Best meeting chunk and its TTFT: best split + finish + the pipeline's fixed cost."""
        meet, split_s = oracle_split(self.compute_s, self.load_s(bandwidth_mbps, concurrency))
        return meet, split_s + self.finish_s + fixed_s


async def measure_profile(
    runner: ModelRunner, store: ChunkStore, prompt: PromptChunks, hit: int
) -> Profile:
    """Compute every hit chunk in order, read each from the store, time the finish."""
    cache = runner.new_cache()
    compute_s = []
    for i in range(hit):
        start = time.perf_counter()
        runner.extend(cache, prompt.tokens_of(i, i + 1))
        compute_s.append(time.perf_counter() - start)
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
    next(runner.generate(cache, logits, SamplingParams(max_tokens=1)))
    return Profile(compute_s, read_s, sizes, time.perf_counter() - start)
