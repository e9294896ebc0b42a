"""The adaptive estimate: per-chunk costs and the advice they give."""

from __future__ import annotations

import pytest

from shared.core.estimator import Advice, Ewma, SplitEstimator, best_meet


def test_ewma_tracks_recent_samples() -> None:
    e = Ewma(alpha=0.5)
    assert e.value is None
    e.add(4.0)
    assert e.value == 4.0
    e.add(1.0)
    assert e.value == pytest.approx(2.0)  # the geometric mean of 4 and 1
    fast, slow = Ewma(alpha=0.5, value=1.0), Ewma(alpha=0.5, value=1.0)
    fast.add(1 / 16)
    slow.add(16.0)
    assert fast.value == pytest.approx(1 / 4) and slow.value == pytest.approx(4.0)  # symmetric
    for _ in range(20):
        e.add(10.0)
    assert abs(e.value - 10.0) < 1e-3
    twice, once = Ewma(alpha=0.5, value=1.0), Ewma(alpha=0.5, value=1.0)
    twice.add(16.0, weight=2)
    once.add(16.0)
    once.add(16.0)
    assert twice.value == pytest.approx(once.value) == pytest.approx(8.0)
    part = Ewma(alpha=0.5, value=1.0)
    part.add(16.0, weight=0.25)
    assert part.value == pytest.approx(16 ** (1 - 0.5**0.25))  # a quarter of a sample


def test_a_window_of_many_loads_weighs_as_several_samples() -> None:
    """A link that rose 16x: one request's loads (15 chunks) make the estimate advise skipping
    the head at once; a window of four reads or fewer counts as one sample, as it always did
    (on a slow link a split's three loads are all a request shows of it)."""
    est = SplitEstimator()
    est.observe_compute(4, 0.4)  # 0.1 s a chunk
    est.observe_loads(15, 3.0)  # 0.2 s a chunk: the link at half the compute rate
    assert est.advise(15) == Advice(True, 10)
    est.observe_loads(15, 15 * 0.0125)  # 16x faster
    assert est.load_s.value == pytest.approx(0.2 * 16 ** -(1 - 0.5**3.75))  # 0.0154
    assert not est.advise(15).compute_head
    for reads in (1, 4):
        few = SplitEstimator(est.compute_s, Ewma(value=0.2))
        few.observe_loads(reads, reads * 0.0125)
        assert few.load_s.value == pytest.approx(0.05)  # sqrt(0.2 x 0.0125): one sample
    slowed = SplitEstimator(est.compute_s, Ewma(value=0.025))  # a link at 4x the compute rate
    slowed.observe_loads(3, 3 * 0.4)  # a split's 3 loads after it fell to a quarter
    assert slowed.load_s.value == pytest.approx(0.1)  # sqrt(0.025 x 0.4)


def test_a_stall_counts_as_one_sample_of_its_length() -> None:
    est = SplitEstimator()
    est.observe_loads(8, 0.8)
    est.link_stalled(10.0)
    assert est.load_s.value == pytest.approx(1.0)  # sqrt(0.1 x 10)


def test_no_estimate_means_plain_cake() -> None:
    est = SplitEstimator()
    assert est.advise(10) == Advice()
    est.observe_compute(2, 0.2)
    assert est.advise(10) == Advice()  # no load telemetry yet
    est.observe_loads(3, 0.3)
    assert est.advise(0) == Advice()


def test_hits_a_split_would_save_too_little_of_are_computed_whole() -> None:
    """A split pays steps one prefill does not (split_cost_chunks head chunks' worth): a hit
    whose split saves no more is computed whole, without loads."""
    est = SplitEstimator()
    est.observe_compute(2, 0.2)  # 0.1 s a chunk
    est.observe_loads(4, 0.8)  # 0.2 s a chunk: the split saves a third of the head
    assert est.advise(3) == Advice(head_hint=3, fetch=False)  # 1 chunk saved
    assert est.advise(12) == Advice(head_hint=12, fetch=False)  # 4 saved: no more than it costs
    assert est.advise(13) == Advice(True, 9)  # 4.33 saved
    assert est.advise(30) == Advice(True, 20)
    cheap_splits = SplitEstimator(est.compute_s, est.load_s, split_cost_chunks=1.0)
    assert cheap_splits.advise(12) == Advice(True, 8)


def test_hint_is_where_equal_speeds_meet() -> None:
    est = SplitEstimator()
    est.observe_compute(4, 0.4)  # 0.1 s a chunk
    est.observe_loads(8, 0.8)  # 0.1 s a chunk
    assert est.advise(10) == Advice(True, 5)
    slow_link = SplitEstimator()
    slow_link.observe_compute(1, 0.1)
    slow_link.observe_loads(1, 0.9)  # 9x slower: meet near the tail
    assert slow_link.advise(50) == Advice(True, 45)
    assert slow_link.advise(30) == Advice(head_hint=30, fetch=False)  # saves 3 chunks


def test_skip_the_head_when_the_link_is_much_faster() -> None:
    """Below 0.35 of a chunk's compute time (CAKE_SKIP_HEAD_RATIO) a load costs too little
    for a head to pay; at half of it (the link at 2x) a split still does."""
    est = SplitEstimator()
    est.observe_compute(1, 1.0)
    est.observe_loads(10, 3.0)  # 0.3 s a chunk
    assert est.advise(10) == Advice(compute_head=False, head_hint=0)
    at_2x = SplitEstimator(est.compute_s)
    at_2x.observe_loads(10, 5.0)  # 0.5 s a chunk
    assert at_2x.advise(10) == Advice(True, 4)
    for _ in range(5):
        est.observe_loads(10, 8.0)  # the link slows to 0.8 s a chunk: the head helps again
    assert est.advise(10) == Advice(True, 5)


def test_a_wrong_skip_takes_the_pace_its_loads_came_at() -> None:
    """Averaged in, the pace that made a load-only plan compute its head after all would leave
    the estimate advising the next request to skip the head again; it is taken at once."""
    est = SplitEstimator()
    est.observe_compute(2, 0.2)  # 0.1 s a chunk
    for _ in range(3):
        est.observe_loads(10, 0.25)  # 0.025 s a chunk: skip the head
    assert not est.advise(10).compute_head
    est.observe_loads(2, 0.08)  # the first reads after the link fell to 0.04 s a chunk
    assert not est.advise(10).compute_head  # (sqrt(0.025 x 0.04) = 0.032: still a skip)
    est.skip_was_wrong(0.08)
    assert est.advise(10) == Advice(True, 5)
    est.skip_was_wrong(0.01)  # never faster than the estimate was
    assert est.load_s.value == 0.08


def test_estimate_follows_a_changing_link() -> None:
    est = SplitEstimator(split_cost_chunks=1.0)  # so that a 10-chunk hit splits at 4x
    est.observe_compute(1, 0.1)
    est.observe_loads(10, 1.0)
    assert est.advise(10).head_hint == 5
    for _ in range(6):  # the link slows down 4x
        est.observe_loads(10, 4.0)
    assert est.advise(10).head_hint == 8


def test_single_chunk_steps_do_not_drag_the_compute_estimate() -> None:
    est = SplitEstimator()
    est.observe_compute(1, 0.3)  # nothing better yet: counts
    est.observe_compute(1, 0.1)  # still only single steps (CAKE_EXACT_SPLITS): they count
    assert est.compute_s.value == pytest.approx((0.3 * 0.1) ** 0.5)
    est.observe_compute(8, 0.8)
    est.observe_compute(1, 0.3)  # a precise step near the meeting: ignored
    assert est.compute_s.value == pytest.approx((0.3 * 0.1) ** 0.25 * 0.1**0.5)


def test_the_seed_outranks_single_chunk_steps_until_a_large_step_is_seen() -> None:
    est = SplitEstimator()
    est.observe_compute(1, 0.17)  # an end game's one-chunk step: a whole step's overhead
    est.seed_compute(0.1)  # measured when the model loaded: a chunk's share of a large step
    est.observe_compute(1, 0.17)  # ignored from now on
    assert est.compute_s.value == pytest.approx(0.1)
    est.observe_compute(8, 1.6)  # a busy compute service: large steps tell it
    est.seed_compute(0.1)  # too late to matter
    assert est.compute_s.value == pytest.approx((0.1 * 0.2) ** 0.5)


async def test_a_fresh_merger_that_first_hears_a_one_chunk_step_does_not_skip_heads() -> None:
    """A merger started while compute finishes another request's end game hears a one-chunk
    step first (0.17 s, where a chunk costs 0.1 s in a large step). Were that its estimate, a
    link delivering a chunk in 0.071 s would look fast enough to skip the head (< 0.5 x 0.17),
    and with no head computed nothing would ever correct it."""
    from services.merger.service import Merger
    from shared.runtime.config import Settings
    from shared.wire.messages import ComputeTelemetry, ModelInfo, Space

    merger = Merger(None, Settings())  # type: ignore[arg-type]
    end_game = ComputeTelemetry(
        node="n", window_s=1.0, steps=1, step_s=0.17, tokens={"head": 128}, head_chunks=1,
        head_s=0.17, running=1, waiting=0, kv_pool_bytes=0, kv_budget_bytes=1,
    )  # fmt: skip
    await merger.on_telemetry(end_game, "cake.telemetry.x.n")
    space = Space("f", 2, 2, 16, "float32", 128)
    merger.remember(ModelInfo("default", space, None, "n", chunk_compute_s=0.1))
    for estimator in (merger.estimator, merger.node_estimator("n")):
        estimator.observe_loads(10, 0.71)
        assert estimator.compute_s.value == pytest.approx(0.1)
        assert estimator.advise(16).compute_head
    exact = Merger(None, Settings(exact_splits=True))  # type: ignore[arg-type]
    await exact.on_telemetry(end_game, "cake.telemetry.x.n")  # one-chunk steps are the cost
    exact.remember(ModelInfo("default", space, None, "n", chunk_compute_s=0.1))
    assert exact.estimator.compute_s.value == pytest.approx(0.17)


async def test_every_merger_replica_learns_both_sides_from_telemetry() -> None:
    """The estimate comes from the telemetry every replica receives alike: head chunks' cost
    with their queueing, and the link's pace while it was reading (busy time per read)."""
    from services.merger.service import Merger
    from shared.runtime.config import Settings
    from shared.wire.messages import ComputeTelemetry, LoaderTelemetry

    replicas = [Merger(None, Settings()) for _ in range(2)]  # type: ignore[arg-type]
    compute = ComputeTelemetry(
        node="n", window_s=1.0, steps=4, step_s=0.1, tokens={"head": 512}, head_chunks=4,
        head_s=0.8, running=1, waiting=3, kv_pool_bytes=0, kv_budget_bytes=1,
    )  # fmt: skip
    loader = LoaderTelemetry(
        node="n", window_s=1.0, reads=10, nbytes=20_000_000, read_s=0.2, busy_s=0.5,
        in_flight=0, read_limit=4, stalls=0, failures=0,
    )  # fmt: skip
    idle = LoaderTelemetry(
        node="n", window_s=1.0, reads=0, nbytes=0, read_s=0.0, busy_s=0.0, in_flight=0,
        read_limit=4, stalls=0, failures=0,
    )  # fmt: skip
    for merger in replicas:
        for message in (compute, loader, idle):  # a window without reads says nothing
            await merger.on_telemetry(message, "cake.telemetry.x.n")
    for merger in replicas:
        assert merger.estimator.compute_s.value == pytest.approx(0.2)  # queueing included
        assert merger.estimator.load_s.value == pytest.approx(0.05)  # 0.5 s busy / 10 reads


def test_a_link_nobody_loads_from_is_tried_again() -> None:
    """Computing short hits whole observes no loads; without hope the estimate would never
    change, so a link that got faster meanwhile would never be used again."""
    est = SplitEstimator()
    est.observe_compute(4, 0.4)  # 0.1 s a chunk
    est.observe_loads(1, 2.0)  # 2 s a chunk: a 30-chunk hit's split would save 1.4 chunks
    tries = 0
    while not est.advise(30).fetch:
        est.loads_unobserved()
        tries += 1
    assert 2 <= tries <= 5


def test_chunks_in_the_near_tier_load_at_their_own_pace() -> None:
    """With a near tier (a local directory in front of S3) the lookup says which chunks it
    holds: those cost the near pace, the rest the link's, the two tiers read side by side, and
    the hint follows. (Powers of two: exact arithmetic.)"""
    est = SplitEstimator()
    est.observe_compute(2, 0.25)  # 1/8 s a chunk
    est.observe_loads(4, 1.0)  # the far link: 1/4 s a chunk
    assert est.advise(30) == Advice(True, 20)  # ceil(30 * 0.25 / 0.375)
    assert est.advise(30, near=range(20, 30)) == Advice(True, 20)  # near pace unknown: as far
    est.observe_near_loads(8, 0.125)  # 1/64 s a chunk
    # meeting at 14: the head takes 14/8 = 1.75 s, the far chunks [14, 20) 1.5 s beside the near
    # ones' 0.16 s; at 13 the far side takes 1.75 s too: the tie goes to fewer loads
    assert est.advise(30, near=range(20, 30)) == Advice(True, 14)
    assert best_meet(30, 0.125, [0.25] * 20 + [1 / 64] * 10, range(20, 30)) == (14, 1.75)
    assert est.advise(30, near=range(30)) == Advice(compute_head=False, head_hint=0)
