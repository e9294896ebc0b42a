"""The bidirectional compute/load plan as pure logic: no I/O, no tensors.

A prompt of n tokens has ``full`` complete storage chunks; the longest stored prefix of them is
the hit. The compute side fills chunks 0, 1, 2... from the head; the loader fetches the hit
chunks from the tail down (P-1, P-2, ...), possibly finishing out of order. They meet when the
compute frontier reaches the load frontier: chunks [0, m) are used as computed, [m, P) as loaded,
and the tokens from P * chunk_tokens on (the uncached suffix, never empty) are prefilled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def usable_hit_chunks(stored_prefix: int, n_tokens: int, chunk_tokens: int) -> int:
    """Hit chunks that can be loaded: the last prompt token is always computed for its logits."""
    if n_tokens <= 0:
        return 0
    return max(0, min(stored_prefix, (n_tokens - 1) // chunk_tokens))


@dataclass(frozen=True)
class Split:
    """Which chunks come from which side, once both sides stopped."""

    meet: int
    hit: int

    @property
    def computed(self) -> range:
        """Head chunks used as computed."""
        return range(0, self.meet)

    @property
    def loaded(self) -> range:
        """Tail chunks used as loaded."""
        return range(self.meet, self.hit)


@dataclass
class MeetTracker:
    """Follows both frontiers from per-chunk events and says when and where they meet.

    The compute frontier is the number of head chunks computed in order. The load frontier is
    the lowest j such that every hit chunk in [j, hit) is loaded; loads may finish in any order.
    A failed load puts a floor under the load frontier: chunks below it must be computed. When
    nobody computes the head (load-only), the meeting point is the frontier once it reaches the
    floor. A head step announced (HeadComputing) and not yet reported computed is `stepping`.
    """

    hit: int
    compute_head: bool = True
    computed: int = 0
    loaded: set[int] = field(default_factory=set)
    load_frontier: int = -1
    floor: int = 0
    announced: int = 0  # the end of the last head step announced

    def __post_init__(self) -> None:
        if self.hit < 0:
            raise ValueError("hit must be >= 0")
        self.load_frontier = self.hit

    def on_computed(self, upto: int) -> None:
        """Chunks [0, upto) are computed (compute runs in order, so one number says it)."""
        self.computed = max(self.computed, upto)

    def on_head_step(self, upto: int) -> None:
        """A head step computing chunks [0, upto) has begun."""
        self.announced = max(self.announced, upto)

    @property
    def stepping(self) -> bool:
        """Whether a head step it heard announced has not reported yet (so a silence is
        compute's, and loads that stopped short of it are not behind)."""
        return self.announced > self.computed

    def on_loaded(self, index: int) -> None:
        """Hit chunk index is loaded and staged."""
        if not 0 <= index < self.hit:
            raise ValueError(f"loaded chunk {index} is outside the hit [0, {self.hit})")
        self.loaded.add(index)
        while self.load_frontier - 1 in self.loaded:
            self.load_frontier -= 1

    def on_failed(self, index: int) -> None:
        """Hit chunk index cannot be loaded: loads can reach down to index + 1 at best."""
        self.floor = max(self.floor, index + 1)

    def meet(self) -> Split | None:
        """The split once the frontiers touch, else None. Computed chunks win any overlap."""
        if self.computed >= self.load_frontier:
            return Split(meet=min(self.computed, self.hit), hit=self.hit)
        if not self.compute_head and self.load_frontier <= self.floor:
            return Split(meet=self.load_frontier, hit=self.hit)
        return None


def loads_too_slow(
    arrivals: Sequence[float],
    started: float,
    compute_s: float | None,
    ratio: float,
    batch: int = 1,
) -> bool:
    """Whether a load-only plan's own arrivals come at a pace that would not have earned it
    the skip: ratio x the seconds a head chunk takes to compute, or slower.

    From the second arrival on, the faster of two readings of the request's pace counts, so
    that neither a burst nor the first read's latency passes for a slow link: the seconds
    since the start per arrival, where `batch` reads in flight could all land at once (so
    never per fewer than `batch`), and the mean gap since the first arrival. A link far slower
    than the skip assumed shows at once, a marginal one within a round. Once more than `batch`
    chunks arrived (two at least), the pace over the last that many gaps (a whole round of
    reads, burst and wait alike) counts as well: it catches a link that slows mid-request.
    """
    if len(arrivals) < 2 or compute_s is None:
        return False
    slow, n = ratio * compute_s, len(arrivals)
    since_start = (arrivals[-1] - started) / max(n, batch)
    if min(since_start, mean_gap(arrivals) or 0.0) >= slow:
        return True
    last_round = round_pace(arrivals, batch)
    return last_round is not None and last_round >= slow


def mean_gap(arrivals: Sequence[float]) -> float | None:
    """The mean gap between arrivals since the first; None before two arrived."""
    return (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1) if len(arrivals) >= 2 else None


def pace_at_least(arrivals: Sequence[float], started: float, now: float, batch: int) -> float:
    """A pace the loads were at least as slow as: their mean gap from two arrivals on, else
    the wait for the first (or, with none, until now) over the `batch` reads in flight."""
    gap = mean_gap(arrivals)
    return gap if gap is not None else ((arrivals[0] if arrivals else now) - started) / batch


def round_pace(arrivals: Sequence[float], batch: int) -> float | None:
    """The mean gap over the last `batch` gaps (two at least): a whole round of reads in
    flight, burst and wait alike; None until that many arrived."""
    gaps = max(2, batch)
    if len(arrivals) <= gaps:
        return None
    return (arrivals[-1] - arrivals[-1 - gaps]) / gaps


def loads_pace(arrivals: Sequence[float], started: float, now: float, batch: int = 1) -> float:
    """Seconds a chunk takes to arrive at the loads' present pace, for planning a head that
    starts now: the slowest of their mean gap since the first arrival, the last round's (the
    last `batch` gaps, two at least, once that many arrived) and the time since the last
    arrival (or since the start), which grows while the loads stall."""
    readings = [now - (arrivals[-1] if arrivals else started)]
    readings += [r for r in (mean_gap(arrivals), round_pace(arrivals, batch)) if r is not None]
    return max(readings)


OVERDUE_GAPS = 4.0  # a load-only plan is behind when no chunk came for this many gaps of its pace
MIN_OVERDUE_S = 0.25  # nor before this long (arrivals jitter)


def arrival_pace(arrivals: Sequence[float], batch: int) -> float:
    """The slower of the mean gap and the last round's (`batch` reads in flight land in
    bursts); 0 before two arrived."""
    return max(mean_gap(arrivals) or 0.0, round_pace(arrivals, batch) or 0.0)


def loads_due(arrivals: Sequence[float], left: int, now: float, batch: int = 1) -> float | None:
    """Seconds from now until `left` more chunks should have arrived at arrival_pace
    (negative: that long ago), read once more than a round arrived; None before."""
    if not arrivals or (left > 0 and len(arrivals) <= max(1, batch)):
        return None
    return arrivals[-1] + (left * arrival_pace(arrivals, batch) if left > 0 else 0.0) - now


def loads_due_in(arrivals: Sequence[float], left: int, now: float, batch: int = 1) -> float | None:
    """Seconds until `left` more chunks have arrived (0 when they are in, or a little late):
    loads_due, and None once the loads are overdue (OVERDUE_GAPS gaps late, MIN_OVERDUE_S at
    least, also when the last is in but the merger's word does not come): late loads say
    nothing of when they will be in."""
    due = loads_due(arrivals, left, now, batch)
    if due is None:
        return None
    late_s = max(MIN_OVERDUE_S, OVERDUE_GAPS * (arrival_pace(arrivals, batch) if left else 0.0))
    return None if due < -late_s else max(0.0, due)


def head_waits_for(
    arrivals: Sequence[float], left: int, now: float, batch: int, step_s: float | None
) -> float | None:
    """Seconds a head racing its loads waits for them rather than step: while the `left`
    chunks between it and the loads are due (loads_due) sooner than a step of one chunk would
    end (step_s, its real cost: a step's overhead makes it about twice a chunk's share of a
    large step), and until a step's length past when they were due at most; None: it steps
    (the loads' pace or the step's cost unknown, or they came no closer in time)."""
    due = loads_due(arrivals, left, now, batch)
    if due is None or step_s is None or left <= 0 or not -step_s < due < step_s:
        return None
    return due + step_s


def resume_hint(
    frontier: int, pace_s: float | None, compute_s: float | None, done: int = 0,
    since_s: float = 0.0,
) -> int:  # fmt: skip
    """Where a head at chunk `done` going on now should meet loads that go on from `frontier`
    down at one chunk every pace_s, the last having come since_s ago (so the next is due in
    pace_s - since_s): the m with (m - done) x compute_s = (frontier - m) x pace_s - since_s,
    rounded up (more computed, fewer loads, as the estimator's own hint); -1 without both
    paces."""
    if pace_s is None or compute_s is None or compute_s <= 0:
        return -1
    since = min(max(0.0, since_s), pace_s)
    meet = math.ceil((frontier * pace_s + done * compute_s - since) / (compute_s + pace_s))
    return min(frontier, meet)


def live_hint(
    arrivals: Sequence[float],
    frontier: int,
    done: int,
    chunk_s: float | None,
    now: float,
    started: float,
    batch: int = 1,
    early: bool = True,
) -> int:
    """resume_hint at the loads' present pace and a chunk's cost in compute's steps now; -1
    without that cost or a pace. Once more than `batch` arrived, the pace is loads_pace (a
    stall counts); before, with `early`, the mean time per arrival since `started` (the first
    read's latency included, so it errs towards computing more: fit to stop a head short of a
    stale hint, not to send it past one); without `early` (past the hint), loads_pace once two
    arrived (a burst's close arrivals read fast, and the head then takes one chunk a step,
    as it would by halving), and before that pace_at_least: with `batch` reads in flight since
    `started`, none or one in, the loads are at least that slow, so the head goes at least as
    far as they would meet it at that pace, in one step (on a link much slower than believed,
    halving the gap took four steps or more, a step's overhead each)."""
    if chunk_s is None:
        return -1
    if len(arrivals) > max(1, batch) or (not early and len(arrivals) >= 2):
        pace, since = loads_pace(arrivals, arrivals[0], now, batch), now - arrivals[-1]
        # the next is due a pace after the last, unless they stall (the wait is the pace then)
        return resume_hint(frontier, pace, chunk_s, done, since if since < pace else 0.0)
    if not early:
        return resume_hint(frontier, pace_at_least(arrivals, started, now, batch), chunk_s, done)
    return resume_hint(frontier, (now - started) / len(arrivals), chunk_s, done) if arrivals else -1


def loads_overdue_after(
    arrivals: Sequence[float],
    reads_s: Sequence[float],
    started: float,
    prior_gap_s: float | None,
    cap_s: float,
) -> float:
    """When (on the arrivals' clock) a load-only plan counts as behind: OVERDUE_GAPS times its
    pace after the last arrival (or the start). The pace is the mean gap between this
    request's arrivals, else the estimator's seconds per chunk (prior_gap_s); without either,
    cap_s (the fetch timeout). Concurrent reads arrive in bursts, so it is never sooner than
    twice a read's median duration (reads_s) after the last arrival either. At least
    MIN_OVERDUE_S, at most cap_s after it."""
    last = arrivals[-1] if arrivals else started
    gap = mean_gap(arrivals)
    gap = prior_gap_s if gap is None else gap
    if gap is None:
        return last + cap_s
    read = sorted(reads_s)[len(reads_s) // 2] if reads_s else 0.0
    return last + min(cap_s, max(MIN_OVERDUE_S, OVERDUE_GAPS * gap, 2 * read))


def head_step(
    done: int, hit: int, frontier: int, hint: int, step: int, max_step: int,
    live: int = -1, first: int | None = None,
) -> int:  # fmt: skip
    """Head chunks the next compute step takes, stopping where staged chunks begin.

    Without a hint of the meeting point (-1): `step` chunks. A hint (>= 0) comes from an
    estimate that may be stale, so the first step takes `first` chunks at most (`step` unless
    given) while the loads' pace is unknown; by its end their progress shows: the frontier,
    and once their pace is read, `live` (where the head should meet them at it, >= 0). The
    next step goes the rest of the way at once (at most max_step chunks) to the hint, or to
    `live` when that is nearer; once past the hint, to `live`. A head that has reached where
    it should meet loads of a known pace takes one chunk a step (they come to it); without a
    pace, each step takes half the chunks left between the head and the loads (at most
    `step`, at least one).
    """
    if hint >= 0:
        target = hint if live < 0 else (live if done >= hint else min(hint, live))
        if done == 0 and live < 0 and target > 0:
            step = min(target, step if first is None else first)
        elif done < target:
            step = min(target - done, max_step)
        elif live >= 0:
            step = 1
        else:
            step = min(step, (frontier - done) // 2)
    return max(1, min(step, hit - done, frontier - done))


def oracle_split(
    compute_s: Sequence[float], load_s: Sequence[float], load_latency_s: float = 0.0
) -> tuple[int, float]:
    """The best meeting point m and its time, max(sum(compute[:m]), latency + sum(load[m:])).

    compute_s[i] and load_s[i] are the measured seconds to compute or load hit chunk i; the
    load side starts load_latency_s late (and costs nothing when it loads nothing).
    """
    if len(compute_s) != len(load_s):
        raise ValueError("compute and load profiles must cover the same chunks")
    n = len(compute_s)
    best_m, best_t = 0, (load_latency_s + sum(load_s)) if n else 0.0
    head, tail = 0.0, sum(load_s)
    for m in range(1, n + 1):
        head += compute_s[m - 1]
        tail -= load_s[m - 1]
        t = max(head, load_latency_s + tail if m < n else 0.0)
        if t < best_t:
            best_m, best_t = m, t
    return best_m, best_t
