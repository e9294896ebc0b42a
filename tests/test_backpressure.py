"""Bounded KV memory over real NATS: requests beyond the budget wait in a bounded queue, the
rest are refused with 429 and Retry-After, and every admitted request completes exactly."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from shared.core.errors import ErrorCode
from shared.storage.local import LocalStore
from shared.wire.messages import Done, Failed
from tests.harness import Backend, backend, default_runner, stack_settings

MAX_TOKENS = 24


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(256) for _ in range(n - 1)]


def need_gb(prompt_tokens: int) -> float:
    """The KV a request of this size reserves."""
    per_token = default_runner().layout.bytes_per_token
    return (prompt_tokens + MAX_TOKENS) * per_token / 2**30


@pytest.fixture
async def one_at_a_time(nats_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    """Room in KV memory for one 300-token request, and a queue of one."""
    settings = stack_settings(nats_url, tmp_path, kv_memory_gb=need_gb(300) * 1.5, max_waiting=1)
    services = ("merger", "compute", "loader", "gateway")
    async with LocalStore(settings.store) as store, backend(settings, store, services) as be:
        yield be


async def test_one_runs_one_waits_the_rest_are_told_when_to_retry(one_at_a_time: Backend) -> None:
    be = one_at_a_time
    tokens = [prompt(300, seed=i) for i in range(4)]
    refs = [await be.generate(t, kv_mode="compute", max_tokens=MAX_TOKENS) for t in tokens]
    results = await asyncio.gather(
        *(be.generate(t, salt="busy", max_tokens=MAX_TOKENS) for t in tokens)
    )
    done = [i for i, r in enumerate(results) if isinstance(r.end, Done)]
    refused = [r.end for r in results if isinstance(r.end, Failed)]
    assert len(done) == 2 and len(refused) == 2
    for failed in refused:
        assert failed.code == ErrorCode.OVERLOADED and failed.status == 429
        assert failed.retry_after_s >= 1
    for i in done:  # the admitted ones (the one that waited too) are exact
        assert results[i].tokens == refs[i].tokens


async def test_the_gateway_answers_429_with_retry_after(one_at_a_time: Backend) -> None:
    be = one_at_a_time
    body = {"prompt": "x" * 299, "max_tokens": MAX_TOKENS, "temperature": 0}
    async with aiohttp.ClientSession() as http:

        async def post(stream: bool) -> tuple[int, str | None, dict]:
            async with http.post(
                f"{be.url}/v1/completions", json={**body, "stream": stream}
            ) as resp:
                payload = await resp.json() if resp.status != 200 else {}
                if resp.status == 200:
                    await resp.read()
                return resp.status, resp.headers.get("Retry-After"), payload

        answers = await asyncio.gather(*(post(stream=i % 2 == 1) for i in range(6)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 429}
    busy = [(retry, payload) for status, retry, payload in answers if status == 429]
    assert busy, statuses
    for retry, payload in busy:
        assert retry is not None and int(retry) >= 1
        assert payload["error"]["code"] == "overloaded"
        assert "busy" in payload["error"]["message"]


async def test_a_request_larger_than_kv_memory_is_refused_with_400(
    one_at_a_time: Backend,
) -> None:
    result = await one_at_a_time.generate(prompt(900, seed=9), max_tokens=MAX_TOKENS)
    assert isinstance(result.end, Failed)
    assert result.end.code == ErrorCode.TOO_LARGE and result.end.status == 400
    assert "KV memory" in result.end.message
