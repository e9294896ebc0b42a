"""One request's fetch on the loader: which chunks are still worth a read, and the meeting
point it takes itself (no merger word needed)."""

from __future__ import annotations

import time

from services.loader.service import Fetch
from shared.core.keys import KeySpace, KVLayout, PromptChunks, pack_tokens
from shared.wire.messages import FetchJob, Space

CHUNK = 64


def fetch_of(hit: int = 8) -> Fetch:
    """A fetch of `hit` chunks of a prompt one token longer than them."""
    space = KeySpace("model", KVLayout(2, 2, 8, "float32"), CHUNK)
    tokens = list(range(1, hit * CHUNK + 2))
    job = FetchJob("r", pack_tokens(tokens), Space.of(space), hit, time.time() + 30)
    return Fetch(job, PromptChunks.of(space, tokens))


def test_reads_below_the_head_a_failed_load_or_the_meet_are_not_worth_it() -> None:
    fetch = fetch_of()
    assert all(fetch.wants(j) for j in range(8))
    fetch.frontiers.on_head_step(2)  # a head step computes [0, 2)
    assert [fetch.wants(j) for j in (1, 2)] == [False, True]
    fetch.frontiers.on_failed(4)  # the head must compute chunk 4, and so every one below it
    assert [fetch.wants(j) for j in (4, 5)] == [False, True]
    fetch.decide(6)
    assert [fetch.wants(j) for j in (5, 6)] == [False, True] and fetch.decided.is_set()


def test_the_fetch_meets_where_the_computed_head_reaches_its_reads_in_any_order() -> None:
    """Reads land out of order; the meeting point is taken once every chunk from the computed
    head on is staged, at the head (computed chunks win the overlap), as the merger would."""
    fetch = fetch_of()
    fetch.frontiers.on_computed(3)
    for j in (7, 5, 6, 4):
        fetch.frontiers.on_loaded(j)
        fetch.meet_if_reached()
        assert fetch.meet is None  # chunk 3 is neither computed nor staged
    fetch.frontiers.on_computed(5)  # past where the loads reached (4)
    fetch.meet_if_reached()
    assert fetch.meet == 5 and fetch.decided.is_set()
    fetch.frontiers.on_loaded(3)  # a late read changes nothing once it is decided
    fetch.meet_if_reached()
    assert fetch.meet == 5


def test_a_load_only_fetch_meets_at_chunk_0_once_every_chunk_is_staged() -> None:
    fetch = fetch_of(4)
    for j in (3, 1, 2):
        fetch.frontiers.on_loaded(j)
        fetch.meet_if_reached()
    assert fetch.meet is None
    fetch.frontiers.on_loaded(0)
    fetch.meet_if_reached()
    assert fetch.meet == 0
