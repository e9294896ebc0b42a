"""The loader node's read limit (AIMD) and the gate that enforces it across requests."""

from __future__ import annotations

import asyncio

import pytest

from services.loader.gate import ReadGate
from shared.core.fetch_limit import FetchLimit

MB = 1_000_000


def test_the_limit_grows_while_reads_keep_their_pace() -> None:
    limit = FetchLimit(4.0, max_limit=16)
    for _ in range(40):
        limit.on_read(0.01, MB)  # a latency-bound store: more at once costs nothing
    assert limit.slots == 9  # about one more per round of `limit` reads (4 -> 9.8 in 40)
    for _ in range(200):
        limit.on_read(0.01, MB)
    assert limit.slots == 16  # never past the cap


def test_the_limit_shrinks_when_reads_queue_and_halves_on_errors() -> None:
    limit = FetchLimit(8.0, max_limit=16)
    limit.on_read(0.01, MB)
    for _ in range(8):
        limit.on_read(0.05, MB)  # five times slower per byte: the store is queueing
    assert limit.slots == 6  # one cut (8.1 x 0.8) for the round, not one per slow read
    for _ in range(40):
        limit.on_read(0.05, MB)
    assert limit.slots <= 3
    limit.on_failure()
    assert limit.slots == max(1, int(limit.limit)) and limit.limit < 2
    for _ in range(5):
        limit.on_failure()
    assert limit.slots == 1  # never below one read
    with pytest.raises(ValueError):
        FetchLimit(0.5, max_limit=4)


def test_the_recent_best_pace_forgets_so_a_slower_link_is_not_a_queue_forever() -> None:
    limit = FetchLimit(4.0, max_limit=16)
    limit.on_read(0.01, MB)
    for _ in range(200):
        limit.on_read(0.03, MB)  # the link got three times slower, for good
    assert limit.best_s_per_mb is not None and limit.best_s_per_mb > 0.015
    assert limit.slots >= 2  # it grows again once the new pace is the norm


async def test_the_gate_holds_reads_of_every_request_to_the_limit() -> None:
    gate = ReadGate(FetchLimit(3.0, max_limit=3))
    most = 0

    async def read() -> None:
        nonlocal most
        await gate.acquire()
        try:
            most = max(most, gate.in_flight)
            await asyncio.sleep(0.01)
        finally:
            await gate.release()

    await asyncio.gather(*(read() for _ in range(20)))  # say, 5 requests x 4 workers
    assert most == 3 and gate.in_flight == 0
