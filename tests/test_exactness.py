"""INVARIANT: greedy output from a merged cache equals compute-only output, for every split."""

from __future__ import annotations

import random

import pytest
import torch

from shared.core.keys import KeySpace, PromptChunks
from shared.core.plan import Split
from shared.core.request import Sampling
from shared.kv.engine import fetch_chunk, lookup_hit, merged_prefill, write_back
from shared.kv.model import ModelRunner
from shared.storage.memory import MemoryStore
from tests.models import CONFIGS, tiny_runner

NEW_TOKENS = 32
GREEDY = Sampling(max_tokens=NEW_TOKENS)


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def compute_only(runner: ModelRunner, ids: list[int], chunk: int) -> tuple[list[int], list]:
    cache = runner.new_cache()
    logits = runner.prefill_chunks(cache, ids, chunk)
    kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    return list(runner.generate(cache, logits, GREEDY)), kv


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runner(request: pytest.FixtureRequest) -> ModelRunner:
    return tiny_runner(request.param)


# (chunk tokens, prompt tokens, stored prefix tokens): no hit, partial hit, full hit with an
# uncached suffix, and a full hit of an exact multiple of the chunk size (no suffix at all).
CASES = [
    (16, 90, 0),
    (16, 90, 40),
    (16, 90, 90),
    (32, 96, 96),
    (8, 50, 33),
]


@pytest.mark.parametrize(("chunk", "n_tokens", "stored_tokens"), CASES)
async def test_every_meeting_point_matches_compute_only(
    runner: ModelRunner, chunk: int, n_tokens: int, stored_tokens: int
) -> None:
    ids = prompt_ids(n_tokens, seed=n_tokens + chunk)
    space = KeySpace(runner.fingerprint, runner.layout, chunk_tokens=chunk)
    prompt = PromptChunks.of(space, ids)
    want_tokens, want_kv = compute_only(runner, ids, chunk)

    # an earlier request stored the prefix (it ended inside or at the end of this prompt)
    store = MemoryStore()
    earlier = PromptChunks.of(space, ids[:stored_tokens])
    earlier_cache = runner.new_cache()
    if stored_tokens:
        runner.prefill_chunks(earlier_cache, earlier.token_ids, chunk)
    await write_back(runner, store, earlier, earlier_cache)

    hit = await lookup_hit(store, prompt)
    assert hit == min(stored_tokens // chunk, (n_tokens - 1) // chunk)
    loaded = {j: await fetch_chunk(store, prompt, j) for j in range(hit)}
    assert all(kv is not None for kv in loaded.values())

    one_shot = runner.new_cache()
    runner.extend(one_shot, ids)
    for meet in range(hit + 1):
        cache, logits = merged_prefill(runner, prompt, Split(meet, hit), loaded)  # type: ignore[arg-type]
        for (k, v), layer, full in zip(want_kv, cache.layers, one_shot.layers, strict=True):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
            assert (layer.keys - full.keys).abs().max() < 1e-5
            assert (layer.values - full.values).abs().max() < 1e-5
        got = list(runner.generate(cache, logits, GREEDY))
        assert got == want_tokens, f"meet={meet} hit={hit}"
        assert len(got) == NEW_TOKENS


async def test_partially_computed_head_is_continued(runner: ModelRunner) -> None:
    """The compute service hands over a cache holding some head chunks; the rest is filled."""
    chunk, ids = 16, prompt_ids(100, seed=7)
    space = KeySpace(runner.fingerprint, runner.layout, chunk_tokens=chunk)
    prompt = PromptChunks.of(space, ids)
    want_tokens, _ = compute_only(runner, ids, chunk)
    store = MemoryStore()
    full_cache = runner.new_cache()
    runner.prefill_chunks(full_cache, ids, chunk)
    await write_back(runner, store, prompt, full_cache)
    loaded = {j: await fetch_chunk(store, prompt, j) for j in range(6)}
    head = runner.new_cache()
    runner.prefill_chunks(head, prompt.tokens_of(0, 2), chunk)
    cache, logits = merged_prefill(runner, prompt, Split(4, 6), loaded, cache=head)  # type: ignore[arg-type]
    assert list(runner.generate(cache, logits, GREEDY)) == want_tokens


def test_tail_chunk_computed_without_its_head_never_matches() -> None:
    runner = tiny_runner("llama")
    space = KeySpace(runner.fingerprint, runner.layout, chunk_tokens=16)
    head_a, head_b, tail = prompt_ids(32, 1), prompt_ids(32, 2), prompt_ids(16, 3)
    keys_a = space.chunk_keys(head_a + tail)
    keys_b = space.chunk_keys(head_b + tail)
    keys_alone = space.chunk_keys(tail)
    assert keys_a[2] != keys_b[2]
    assert keys_alone[0] not in {keys_a[2], keys_b[2]}
