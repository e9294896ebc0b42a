"""The adaptive estimate: per-chunk costs and the advice they give."""

from __future__ import annotations

from shared.estimator import Advice, Ewma, SplitEstimator


def test_ewma_tracks_recent_samples() -> None:
    e = Ewma(alpha=0.5)
    assert e.value is None
    e.add(4.0)
    assert e.value == 4.0
    e.add(2.0)
    assert e.value == 3.0
    for _ in range(20):
        e.add(10.0)
    assert abs(e.value - 10.0) < 1e-3


def test_no_estimate_means_plain_cake() -> None:
    est = SplitEstimator()
    assert est.advise(10) == Advice()
    est.observe_compute(2, 0.2)
    assert est.advise(10) == Advice()  # no load telemetry yet
    est.observe_loads(3, 0.3)
    assert est.advise(0) == Advice()


def test_hint_is_where_equal_speeds_meet() -> None:
    est = SplitEstimator()
    est.observe_compute(4, 0.4)  # 0.1 s a chunk
    est.observe_loads(8, 0.8)  # 0.1 s a chunk
    assert est.advise(10) == Advice(True, 5)
    slow_link = SplitEstimator()
    slow_link.observe_compute(1, 0.1)
    slow_link.observe_loads(1, 0.9)  # 9x slower: meet near the tail
    assert slow_link.advise(10) == Advice(True, 9)


def test_skip_the_head_when_loading_everything_beats_one_chunk() -> None:
    est = SplitEstimator()
    est.observe_compute(1, 1.0)
    est.observe_loads(10, 0.2)  # all 10 chunks in 0.2 s < half a chunk's compute
    assert est.advise(10) == Advice(compute_head=False, head_hint=0)
    assert est.advise(40).compute_head  # 0.8 s of loading: computing chunk 0 may help


def test_estimate_follows_a_changing_link() -> None:
    est = SplitEstimator()
    est.observe_compute(1, 0.1)
    est.observe_loads(10, 1.0)
    assert est.advise(10).head_hint == 5
    for _ in range(6):  # the link slows down 4x
        est.observe_loads(10, 4.0)
    assert est.advise(10).head_hint == 8
