"""The bidirectional plan as pure logic."""

from __future__ import annotations

import random

import pytest

from shared.core.plan import (
    MIN_OVERDUE_S,
    MeetTracker,
    Split,
    head_step,
    head_waits_for,
    live_hint,
    loads_due_in,
    loads_overdue_after,
    loads_pace,
    loads_too_slow,
    oracle_split,
    pace_at_least,
    resume_hint,
    usable_hit_chunks,
)


@pytest.mark.parametrize(
    ("stored", "n_tokens", "chunk", "want"),
    [
        (0, 1000, 256, 0),
        (2, 1000, 256, 2),  # partial hit
        (3, 1000, 256, 3),  # full hit with a 232-token suffix
        (4, 1024, 256, 3),  # exact multiple: the last chunk is computed for its logits
        (9, 1024, 256, 3),  # a stored prefix longer than the prompt's chunks
        (1, 256, 256, 0),
        (5, 0, 256, 0),
    ],
)
def test_usable_hit(stored: int, n_tokens: int, chunk: int, want: int) -> None:
    assert usable_hit_chunks(stored, n_tokens, chunk) == want


def test_split_ranges() -> None:
    s = Split(meet=3, hit=7)
    assert list(s.computed) == [0, 1, 2] and list(s.loaded) == [3, 4, 5, 6]
    assert list(Split(0, 0).loaded) == [] and list(Split(0, 4).computed) == []


def test_frontiers_meet_in_order() -> None:
    t = MeetTracker(hit=6)
    assert t.meet() is None
    t.on_loaded(5)
    t.on_computed(1)
    assert t.meet() is None and t.load_frontier == 5
    t.on_loaded(4)
    t.on_loaded(3)
    t.on_computed(2)
    assert t.meet() is None
    t.on_computed(3)
    assert t.meet() == Split(3, 6)


def test_a_head_step_is_under_way_from_its_announcement_to_its_report() -> None:
    t = MeetTracker(hit=6)
    assert not t.stepping
    t.on_head_step(1)
    assert t.stepping
    t.on_computed(1)
    t.on_head_step(4)
    assert t.stepping and t.meet() is None  # an announcement moves no frontier
    t.on_computed(4)
    assert not t.stepping


def test_out_of_order_loads_only_count_when_contiguous_from_the_tail() -> None:
    t = MeetTracker(hit=5)
    for j in (1, 2, 3):  # chunk 4 still missing: the load frontier has not moved
        t.on_loaded(j)
    t.on_computed(1)
    assert t.load_frontier == 5 and t.meet() is None
    t.on_loaded(4)
    assert t.load_frontier == 1
    assert t.meet() == Split(1, 5)


def test_no_hit_meets_at_once_and_compute_wins_overlap() -> None:
    assert MeetTracker(hit=0).meet() == Split(0, 0)
    t = MeetTracker(hit=4)
    t.on_loaded(3)
    t.on_loaded(2)
    t.on_computed(3)  # chunk 2 is both computed and loaded: use the computed one
    assert t.meet() == Split(3, 4)
    t2 = MeetTracker(hit=2)
    t2.on_computed(5)
    assert t2.meet() == Split(2, 2)


def test_all_loaded_meets_at_zero() -> None:
    t = MeetTracker(hit=3)
    for j in (0, 2, 1):
        t.on_loaded(j)
    assert t.meet() == Split(0, 3)


def test_loaded_index_outside_hit_is_refused() -> None:
    with pytest.raises(ValueError):
        MeetTracker(hit=2).on_loaded(2)


def test_random_event_orders_always_meet_on_a_valid_split() -> None:
    rng = random.Random(0)
    for _ in range(500):
        hit = rng.randrange(0, 12)
        t = MeetTracker(hit=hit)
        loads = list(range(hit))
        rng.shuffle(loads)
        computed = 0
        while (split := t.meet()) is None:
            if loads and rng.random() < 0.5:
                t.on_loaded(loads.pop())
            else:
                computed += 1
                t.on_computed(computed)
        assert 0 <= split.meet <= hit
        assert all(j in t.loaded for j in split.loaded)
        assert split.meet <= max(computed, 0) or hit == 0


def brute_force(comp: list[float], load: list[float]) -> float:
    return min(max(sum(comp[:m]), sum(load[m:])) for m in range(len(comp) + 1))


def test_oracle_split_matches_brute_force() -> None:
    rng = random.Random(1)
    for n in range(0, 9):
        c = [rng.uniform(0.01, 1) * (1 + i / 4) for i in range(n)]  # compute grows with position
        load = [rng.uniform(0.01, 1) for _ in range(n)]
        m, t = oracle_split(c, load)
        assert t == pytest.approx(brute_force(c, load))
        assert t == pytest.approx(max(sum(c[:m]), sum(load[m:])))


def test_oracle_split_extremes_and_balance() -> None:
    assert oracle_split([1.0] * 4, [0.1] * 4) == (0, pytest.approx(0.4))  # load everything
    assert oracle_split([0.1] * 4, [1.0] * 4) == (4, pytest.approx(0.4))  # compute everything
    m, t = oracle_split([1.0] * 8, [1.0] * 8)  # equal speeds: half each, twice as fast
    assert m == 4 and t == pytest.approx(4.0)
    assert oracle_split([], []) == (0, 0)
    with pytest.raises(ValueError):
        oracle_split([1.0], [])


def test_failed_load_sets_a_floor_for_load_only() -> None:
    t = MeetTracker(hit=6, compute_head=False)
    t.on_loaded(5)
    t.on_failed(3)  # chunks 4 and 5 can still come from storage
    assert t.meet() is None
    t.on_loaded(4)
    assert t.meet() == Split(4, 6)  # compute takes [0, 4)
    cake = MeetTracker(hit=6)
    cake.on_failed(3)
    cake.on_loaded(5)
    cake.on_loaded(4)
    assert cake.meet() is None  # compute is on its way up to chunk 4
    cake.on_computed(4)
    assert cake.meet() == Split(4, 6)


def test_head_steps_probe_then_follow_the_hint_then_close_in_on_the_loads() -> None:
    assert head_step(0, 20, 20, hint=-1, step=4, max_step=16) == 4  # no estimate: fixed steps
    assert head_step(0, 20, 20, hint=9, step=4, max_step=16) == 4  # a first step of 4 at most
    assert head_step(0, 20, 20, hint=2, step=4, max_step=16) == 2  # (or to a nearer hint)
    assert head_step(4, 20, 20, hint=9, step=4, max_step=16) == 5  # then to the hint
    assert head_step(4, 20, 20, hint=30, step=4, max_step=16) == 16  # within the budget
    assert head_step(4, 20, 7, hint=9, step=4, max_step=16) == 3  # loads already reach 7
    assert head_step(9, 20, 11, hint=9, step=4, max_step=16) == 1  # past it, loads near: 1
    assert head_step(9, 20, 10, hint=9, step=4, max_step=16) == 1
    assert head_step(9, 20, 15, hint=9, step=4, max_step=16) == 3  # loads behind: half the gap
    assert head_step(9, 20, 20, hint=9, step=4, max_step=16) == 4  # at most a full step
    assert head_step(18, 20, 20, hint=-1, step=4, max_step=16) == 2  # the hit's end


def test_a_hinted_head_probes_one_chunk_then_goes_where_the_loads_pace_says() -> None:
    assert head_step(0, 20, 20, hint=9, step=4, max_step=16, first=1) == 1  # the probe
    assert head_step(0, 20, 20, hint=-1, step=4, max_step=16, first=1) == 4  # no hint: no probe
    assert head_step(0, 20, 20, hint=9, step=4, max_step=16, live=5, first=1) == 5  # pace known
    # the loads' pace says meet at 3, nearer than the stale hint of 9: go there
    assert head_step(1, 20, 14, hint=9, step=4, max_step=16, live=3, first=1) == 2
    assert head_step(1, 20, 20, hint=9, step=4, max_step=16, live=12, first=1) == 8  # the hint
    assert head_step(3, 20, 6, hint=9, step=4, max_step=16, live=3, first=1) == 1  # then close in
    # past the hint the loads' pace leads: slower loads, a larger step than halving's 4
    assert head_step(9, 20, 20, hint=9, step=4, max_step=16, live=14, first=1) == 5
    assert head_step(9, 20, 20, hint=9, step=4, max_step=16, live=9, first=1) == 1


def test_the_live_hint_reads_the_loads_pace_from_their_first_arrival() -> None:
    fast = [0.03 + 0.01 * i for i in range(6)]  # six in, a chunk every 0.01 s, from 0.03 s
    assert live_hint([], 15, 1, 0.07, now=0.1, started=0.0) == -1  # nothing in yet
    # two in by 0.1 s (a round's burst still landing): 0.05 s a chunk since the start, the
    # first read's latency included: (m - 1) 0.07 = (13 - m) 0.05, m = 6
    assert live_hint(fast[:2], 13, 1, 0.07, now=0.1, started=0.0, batch=4) == 6
    # six in: the loads' own pace, 0.01 s: (m - 1) 0.07 = (9 - m) 0.01, m = 2, rounded up
    assert live_hint(fast, 9, 1, 0.07, now=0.085, started=0.0, batch=4) == 2
    # nothing came for 0.42 s since: a stall reads as that pace, and the head goes far
    assert live_hint(fast, 9, 1, 0.07, now=0.5, started=0.0, batch=4) == 8
    assert live_hint(fast, 9, 1, None, now=0.085, started=0.0, batch=4) == -1  # no token pace
    # past the hint the early reading does not count (a burst's first arrival misreads it), only
    # a pace the loads are at least as slow as: the first's 0.03 s over 4 reads in flight,
    # (m - 9) 0.07 = (13 - m) 0.0075, m = 9.4, rounded up
    assert live_hint(fast[:1], 13, 9, 0.07, now=0.1, started=0.0, batch=4, early=False) == 10
    # two in: their own pace, here the 0.06 s since the last (a stall): (m - 9) 0.07 =
    # (13 - m) 0.06, m = 11 (halving the four chunks left took the head there too)
    assert live_hint(fast[:2], 13, 9, 0.07, now=0.1, started=0.0, batch=4, early=False) == 11


def test_past_its_hint_a_head_with_no_loads_in_goes_as_far_as_they_could_meet_it() -> None:
    """A link 4x slower than the estimate said: the head reached its hint of 8 at 0.4 s and
    none of the 4 reads in flight since 0 s has landed, so a chunk takes 0.1 s or more to
    arrive. The head (0.045 s a chunk) goes on to chunk 13 in one step, where loads at that
    pace would meet it; halving the gap to the loads would take steps of 3, 2, 1 and 1."""
    # (m - 8) 0.045 = (15 - m) 0.1: m = 12.8, rounded up
    assert live_hint([], 15, 8, 0.045, now=0.4, started=0.0, batch=4, early=False) == 13
    assert head_step(8, 15, 15, hint=8, step=4, max_step=16, live=13, first=1) == 5
    assert head_step(8, 15, 15, hint=8, step=4, max_step=16, first=1) == 3  # halving, without
    assert live_hint([], 15, 1, 0.045, now=0.1, started=0.0, batch=4) == -1  # before the hint


def test_past_its_hint_a_head_meets_serial_loads_where_the_next_ones_land() -> None:
    """A link at 0.25x: one chunk every 0.37 s, the last 0.21 s ago, so the next is due in
    0.16 s and the one after in 0.53 s. The head at chunk 10 (0.1 s a chunk) goes two chunks
    and meets chunk 12 as it lands; it used to take one chunk a step, a step's overhead
    each time."""
    arrivals = [0.378, 0.747]  # chunks 14 and 13
    # (m - 10) 0.1 = (13 - m) 0.369 - 0.212: m = 11.9, rounded up
    assert live_hint(arrivals, 13, 10, 0.1, now=0.959, started=0.0, batch=4, early=False) == 12
    assert head_step(10, 15, 13, hint=10, step=4, max_step=16, live=12, first=1) == 2


def test_oracle_counts_the_load_sides_latency_only_when_it_loads() -> None:
    assert oracle_split([1.0] * 4, [0.1] * 4, load_latency_s=0.5) == (0, pytest.approx(0.9))
    assert oracle_split([0.1] * 4, [1.0] * 4, load_latency_s=5.0) == (4, pytest.approx(0.4))
    m, t = oracle_split([1.0] * 8, [1.0] * 8, load_latency_s=2.0)
    assert (m, t) == (5, pytest.approx(5.0))  # the head takes one more chunk per second late


def test_loads_are_overdue_after_four_gaps_of_their_own_pace() -> None:
    assert loads_overdue_after([], [], 10.0, None, 30.0) == 40.0  # no pace known: the cap
    assert loads_overdue_after([], [], 10.0, 0.5, 30.0) == 12.0  # the estimator's pace
    assert loads_overdue_after([], [], 10.0, 0.001, 30.0) == 10.0 + MIN_OVERDUE_S
    # this request's own pace wins once two chunks arrived: gaps of 0.1 s -> 0.4 s after the last
    assert loads_overdue_after([11.0, 11.1, 11.2], [0.1] * 3, 10.0, 5.0, 30.0) == pytest.approx(
        11.6
    )
    # a burst of four concurrent reads of 0.4 s each: the next comes a read later, not 4 gaps
    burst = [11.0, 11.001, 11.002, 11.003]
    assert loads_overdue_after(burst, [0.4] * 4, 10.0, None, 30.0) == pytest.approx(11.803)
    assert loads_overdue_after([11.0, 21.0], [], 10.0, None, 30.0) == 51.0  # never past the cap


def test_a_load_only_plan_is_behind_once_its_own_pace_would_not_have_earned_the_skip() -> None:
    compute_s, ratio = 0.1, 0.5  # the skip holds while a chunk loads in under 0.05 s
    assert not loads_too_slow([0.06], 0.0, compute_s, ratio)  # one arrival: no pace yet
    assert loads_too_slow([0.06, 0.12], 0.0, compute_s, ratio)
    assert not loads_too_slow([0.03, 0.04, 0.11], 0.0, compute_s, ratio)  # 0.04 s a chunk
    assert not loads_too_slow([0.5, 1.0, 1.5], 0.0, None, ratio)  # no compute estimate: no claim
    # latency before the first arrival is not the pace: 0.03 s gaps after 0.3 s
    assert not loads_too_slow([0.3, 0.33, 0.36], 0.0, compute_s, ratio)
    # four reads issued together: a slow first batch (cold start) is latency, not the pace
    first_batch = [0.3, 0.3, 0.31, 0.32]
    assert not loads_too_slow([*first_batch, 0.33, 0.34], 0.0, compute_s, ratio, batch=4)
    assert loads_too_slow([*first_batch, 0.4, 0.5], 0.0, compute_s, ratio, batch=4)
    # four at a time from a store with 0.12 s of latency: 0.03 s a chunk, bursts or not
    rounds = [r * 0.12 + i * 0.001 for r in range(1, 4) for i in range(4)]
    for seen in range(1, len(rounds) + 1):
        assert not loads_too_slow(rounds[:seen], 0.0, compute_s, ratio, batch=4), seen
    # four at a time sharing a link: each round lands together, 0.04 s a chunk
    shared = [r * 0.16 + i * 0.001 for r in range(1, 4) for i in range(4)]
    for seen in range(1, len(shared) + 1):
        assert not loads_too_slow(shared[:seen], 0.0, compute_s, ratio, batch=4), seen
    # a link that delivers one chunk each 0.08 s (the estimate promised faster) is seen at
    # the third arrival with four reads in flight; one at 0.25 s a chunk at the second
    even = [0.11 + 0.08 * i for i in range(3)]
    assert not loads_too_slow(even[:2], 0.0, compute_s, ratio, batch=4)
    assert loads_too_slow(even, 0.0, compute_s, ratio, batch=4)
    assert loads_too_slow([0.3, 0.55], 0.0, compute_s, ratio, batch=4)
    # four reads of 0.1-0.2 s each in flight (0.04 s a chunk): their spread is not the pace
    assert not loads_too_slow([0.1, 0.18], 0.0, compute_s, ratio, batch=4)
    assert not loads_too_slow([0.1, 0.18, 0.19], 0.0, compute_s, ratio, batch=4)
    # a link that slows during the request: the last round's pace says so
    slowed = [0.02 * i for i in range(1, 9)] + [0.16 + 0.08 * i for i in range(1, 5)]
    assert not loads_too_slow(slowed[:9], 0.0, compute_s, ratio, batch=4)
    assert loads_too_slow(slowed, 0.0, compute_s, ratio, batch=4)


def test_a_resumed_head_aims_where_it_meets_the_loads_at_their_own_pace() -> None:
    # loads go on down from chunk 12 at 0.08 s a chunk, a head chunk costs 0.06 s: they meet
    # where 0.06 m = 0.08 (12 - m), m = 6.9, rounded up (the computed side takes the overlap)
    assert resume_hint(12, 0.08, 0.06) == 7
    assert resume_hint(12, 10.0, 0.06) == 12  # loads all but stopped: the head goes to them
    assert resume_hint(12, 0.001, 0.06) == 1  # loads fast after all: one chunk, then see
    assert resume_hint(12, None, 0.06) == -1  # no pace of its own yet (no gap seen)
    assert resume_hint(12, 0.08, None) == -1
    # a head already at 4: (m - 4) 0.06 = (12 - m) 0.08, m = 8.6, rounded up
    assert resume_hint(12, 0.08, 0.06, done=4) == 9


def test_the_loads_pace_for_a_resumed_head_is_their_slowest_present_reading() -> None:
    assert loads_pace([0.3, 0.5], 0.0, 0.5) == pytest.approx(0.2)  # the gap, not the latency
    assert loads_pace([0.3, 0.5], 0.0, 1.5) == pytest.approx(1.0)  # stalled since: 1 s and more
    assert loads_pace([], 0.0, 0.4) == pytest.approx(0.4)  # nothing yet: at least the wait
    # fast at first, then a round of slow ones (four in flight): the last round's pace
    slowed = [0.02 * i for i in range(1, 9)] + [0.16 + 0.08 * i for i in range(1, 5)]
    assert loads_pace(slowed, 0.0, slowed[-1], batch=4) == pytest.approx(0.08)


def test_loads_due_in_goes_by_the_mean_gap_of_the_arrivals_so_far() -> None:
    assert loads_due_in([0.1, 0.2, 0.3], 0, 0.3) == 0.0  # all in: the merger's word is next
    assert loads_due_in([0.1], 5, 0.2) is None  # one arrival: no pace yet
    assert loads_due_in([0.1, 0.2, 0.3], 2, 0.35) == pytest.approx(0.15)  # 0.3 + 2 x 0.1
    assert loads_due_in([0.1, 0.2, 0.3], 1, 0.6) == 0.0  # a little late: due now
    assert loads_due_in([0.1, 0.2, 0.3], 1, 0.9) is None  # 0.5 s late: over 4 gaps, overdue
    assert loads_due_in([0.1, 0.2], 0, 0.5) is None  # all in, but no Meet for 0.3 s: overdue


def test_loads_due_in_waits_for_more_than_a_round_of_reads_in_flight() -> None:
    assert loads_due_in([0.1, 0.1], 6, 0.1) == 0.0  # one read at a time: a gap of 0, due now
    assert loads_due_in([0.1, 0.1], 6, 0.1, batch=4) is None  # four in flight: a burst, no pace
    bursts = [0.1] * 4 + [0.3] * 4 + [0.5]  # rounds of four, 0.2 s apart: 0.05 s a chunk
    assert loads_due_in(bursts, 4, 0.5, batch=4) == pytest.approx(0.2)


def test_a_head_waits_for_loads_due_sooner_than_its_one_chunk_step() -> None:
    """Loads a chunk each 0.05 s (the last at 1.0 s); a one-chunk step costs 0.08 s. A head one
    chunk short of them at 1.01 s waits: the chunk is due in 0.04 s. It waits at most a step
    past when they were due, then steps as it would have."""
    serial = [0.8, 0.85, 0.9, 0.95, 1.0]
    assert head_waits_for(serial, 1, 1.01, 4, 0.08) == pytest.approx(0.12)  # 0.04 + 0.08
    assert head_waits_for(serial, 2, 1.01, 4, 0.08) is None  # 0.09 s off: the step is sooner
    assert head_waits_for(serial, 1, 1.1, 4, 0.08) == pytest.approx(0.03)  # late: 0.05 more
    assert head_waits_for(serial, 1, 1.14, 4, 0.08) is None  # 0.09 s late: step
    assert head_waits_for(serial, 1, 1.01, 4, None) is None  # a step's cost not known yet
    assert head_waits_for(serial[:4], 1, 1.01, 4, 0.08) is None  # a round's burst: no pace
    assert head_waits_for(serial, 0, 1.01, 4, 0.08) is None  # loads reached it: Meet is next


def test_the_pace_loads_were_at_least_as_slow_as() -> None:
    """From two arrivals, their mean gap; before, no read of 4 in flight landed sooner than the
    first (or, with none, than now), so a chunk took at least that wait over 4."""
    assert pace_at_least([1.0, 1.5, 2.0], started=0.0, now=9.0, batch=4) == 0.5
    assert pace_at_least([2.0], started=0.0, now=9.0, batch=4) == 0.5
    assert pace_at_least([], started=0.0, now=2.0, batch=4) == 0.5
