"""Batched steps: one forward pass over the pieces of many requests, each with its own cache."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from services.compute.service import Compute
from shared.kv import batch
from shared.storage.local import LocalStore
from tests.harness import backend, stack_settings
from tests.models import tiny_runner


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(256) for _ in range(n - 1)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_a_mixed_step_matches_each_piece_alone(arch: str) -> None:
    runner = tiny_runner(arch)
    prompts = [prompt(n, seed=n) for n in (40, 17, 64, 5)]
    alone, together = [], []
    for ids in prompts:  # a 32-token head already in each cache, then the rest of the prompt
        for caches in (alone, together):
            cache = runner.new_cache()
            runner.extend(cache, ids[:32]) if len(ids) > 32 else None
            caches.append(cache)
    rest = [ids[32:] if len(ids) > 32 else ids for ids in prompts]
    want = torch.stack([runner.extend(c, r) for c, r in zip(alone, rest, strict=True)])
    got = runner.step(list(zip(together, rest, strict=True)))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for a, b in zip(alone, together, strict=True):
        assert runner.cache_length(a) == runner.cache_length(b)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.allclose(la.keys, lb.keys, atol=1e-5)


def test_a_piece_alone_is_bit_identical_to_a_stock_forward() -> None:
    runner = tiny_runner("llama")
    ids = prompt(50, seed=1)
    cache = DynamicCache(config=runner.config)
    runner.model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            stock = runner.model(
                input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1
            )
    finally:
        runner.model.set_attn_implementation("cake_step")
    mine = runner.new_cache()
    assert torch.equal(runner.extend(mine, ids), stock.logits[0, -1])
    assert torch.equal(mine.layers[1].values, cache.layers[1].values)


def test_a_step_refuses_empty_pieces() -> None:
    runner = tiny_runner("llama")
    with pytest.raises(ValueError, match="at least one"):
        runner.step([(runner.new_cache(), [])])


async def test_concurrent_requests_share_forward_passes_and_keep_their_tokens(
    nats_url: str, tmp_path: Path
) -> None:
    settings = stack_settings(nats_url, tmp_path)
    passes: list[int] = []
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        compute = be.services["compute"]
        assert isinstance(compute, Compute)
        real = compute.runner.step

        def counted(pieces: Sequence[tuple[DynamicCache, Sequence[int]]]) -> torch.Tensor:
            passes.append(len(pieces))
            return real(pieces)

        prompts = [prompt(100 + 30 * i, seed=50 + i) for i in range(4)]
        alone = [await be.generate(p, kv_mode="compute", max_tokens=24) for p in prompts]
        compute.runner.step = counted  # type: ignore[method-assign]
        together = await asyncio.gather(
            *(be.generate(p, kv_mode="compute", salt="batched", max_tokens=24) for p in prompts)
        )
    assert max(passes) >= 3, passes  # several requests in one pass
    assert len(passes) < sum(passes)
    for a, b in zip(alone, together, strict=True):
        assert a.done.completion_tokens == b.done.completion_tokens
        assert a.tokens == b.tokens  # identical greedy tokens with or without companions


def test_a_plain_forward_after_a_cache_is_causal_from_where_the_cache_ends() -> None:
    runner = tiny_runner("llama")
    ids = prompt(40, seed=3)
    direct = runner.new_cache()
    runner.extend(direct, ids[:30])
    with torch.inference_mode():  # the model called directly, not through ModelRunner.step
        out = runner.model(
            input_ids=torch.tensor([ids[30:]]), cache=direct, use_cache=True, logits_to_keep=1
        )
    stepped = runner.new_cache()
    runner.extend(stepped, ids[:30])
    assert torch.allclose(out.logits[0, -1], runner.extend(stepped, ids[30:]), atol=1e-5)


@pytest.mark.parametrize("path", ["held_then_own", "after_held"])
def test_a_later_piece_is_attended_as_stock_attention_would(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later piece's queries are attended over the held keys and their own (on the CPU: two
    flash passes merged; elsewhere QUERY_BLOCK queries at a time, each over the keys up to its
    own end): every position's logits are those of the model's stock SDPA over the whole masked
    matrix."""
    runner = tiny_runner("llama")
    ids = prompt(60, seed=5)
    head, piece = torch.tensor([ids[:20]]), torch.tensor([ids[20:]])  # 40 queries after 20
    stock_cache = DynamicCache(config=runner.config)
    runner.model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            runner.model(input_ids=head, cache=stock_cache, use_cache=True)
            stock = runner.model(input_ids=piece, cache=stock_cache, use_cache=True).logits[0]
    finally:
        runner.model.set_attn_implementation("cake_step")
    calls: list[int] = []
    attention = getattr(batch, path)

    def counted(q: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(q.shape[2])
        return attention(q, *args)  # type: ignore[no-any-return]

    if path == "after_held":  # the path off the CPU
        monkeypatch.setattr(batch, "CPU_FLASH", None)
        monkeypatch.setattr(batch, "QUERY_BLOCK", 16)
    monkeypatch.setattr(batch, path, counted)
    cache = runner.new_cache()
    with torch.inference_mode():
        runner.model(input_ids=head, cache=cache, use_cache=True)
        mine = runner.model(input_ids=piece, cache=cache, use_cache=True).logits[0]
    layers = runner.layout.layers
    assert calls == ([40] * layers if path == "held_then_own" else [16, 16, 8] * layers)
    assert torch.allclose(mine, stock, atol=1e-5)
    assert torch.equal(mine.argmax(-1), stock.argmax(-1))


def test_a_later_piece_in_half_precision_keeps_its_dtype() -> None:
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 20, 16, dtype=torch.bfloat16) for _ in range(2))
    got = batch.attend(q, k, v, None)
    mask = torch.arange(20)[None, :] <= torch.arange(12, 20)[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=2e-2)


def test_slot_places_chunks_ahead_and_extends_over_them() -> None:
    """Chunks placed out of order past what a slot holds become part of it with extend_to, the
    same bits as appending them in order; a placed chunk may not overlap what is held."""
    runner = tiny_runner("llama")
    chunks = [torch.randn(runner.layout.chunk_shape(4)) for _ in range(3)]
    appended, placed = runner.new_cache(capacity=16), runner.new_cache(capacity=16)
    for kv in chunks:
        appended.append(kv)
    placed.append(chunks[0])
    placed.place(8, chunks[2])  # the tail arrives first
    placed.place(4, chunks[1])
    with pytest.raises(ValueError, match="held already"):
        placed.place(0, chunks[1])
    placed.extend_to(12)
    assert placed.get_seq_length() == 12
    assert torch.equal(placed.chunk(0, 12), appended.chunk(0, 12))


def test_the_cpu_flash_kernel_serves_only_where_it_agrees_with_sdpa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The private kernel is checked once against stock SDPA (GQA heads shared alike); a torch
    where it differs, or lacks it, attends later pieces in query blocks instead."""
    assert batch.cpu_flash() is not None  # this torch
    monkeypatch.setattr(batch.F, "scaled_dot_product_attention", lambda q, *_, **__: 0 * q)
    assert batch.cpu_flash() is None
