"""Admission by projected KV memory: run, wait in order, refuse with a retry hint."""

from __future__ import annotations

import pytest

from shared.core.admission import Admission, Overloaded, TooLarge

MiB = 2**20


def test_requests_run_while_their_needs_fit_the_budget() -> None:
    pool = Admission(budget_bytes=100 * MiB, max_waiting=2)
    assert pool.offer("a", 60 * MiB)
    assert pool.offer("b", 40 * MiB)
    assert pool.reserved_bytes == 100 * MiB
    assert not pool.offer("c", 1 * MiB)  # no room: it waits
    assert list(pool.waiting) == ["c"]


def test_waiting_requests_start_in_arrival_order_as_memory_frees() -> None:
    pool = Admission(budget_bytes=100 * MiB, max_waiting=4)
    pool.offer("a", 90 * MiB)
    pool.offer("b", 50 * MiB)
    pool.offer("c", 10 * MiB)  # would fit now, but waits behind b: first come, first served
    assert list(pool.waiting) == ["b", "c"]
    assert pool.release("a") == ["b", "c"]
    assert pool.reserved_bytes == 60 * MiB and not pool.waiting


def test_a_full_queue_refuses_with_a_retry_hint() -> None:
    pool = Admission(budget_bytes=10 * MiB, max_waiting=1, mean_run_s=4.0)
    pool.offer("a", 10 * MiB)
    pool.offer("b", 10 * MiB)
    with pytest.raises(Overloaded) as refused:
        pool.offer("c", 1 * MiB)
    assert refused.value.code == "overloaded"
    assert refused.value.retry_after_s == 8.0  # two ahead of it, one running at a time
    assert list(pool.waiting) == ["b"]


def test_a_request_larger_than_the_budget_is_refused_outright() -> None:
    pool = Admission(budget_bytes=10 * MiB, max_waiting=8)
    with pytest.raises(TooLarge, match="more than the whole budget"):
        pool.offer("a", 11 * MiB)
    assert not pool.running and not pool.waiting


def test_leaving_the_queue_frees_its_place() -> None:
    pool = Admission(budget_bytes=10 * MiB, max_waiting=1)
    pool.offer("a", 10 * MiB)
    pool.offer("b", 5 * MiB)
    assert pool.release("b") == []  # cancelled while waiting
    assert not pool.offer("c", 5 * MiB)
    assert pool.release("a") == ["c"]
