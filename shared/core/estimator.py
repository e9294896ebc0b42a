"""The adaptive controller's estimate: how fast each side is, and what that suggests.

The merger feeds it each node's telemetry windows and each request's outcome (seconds per
computed head chunk, seconds per loaded chunk on the shared link) as exponentially weighted
geometric averages, a window of loads that read many chunks weighing as several samples, and
asks it for advice before each request: skip the head when the link delivers a chunk in less than
`skip_head_ratio` of the time a chunk takes to compute (the head could then save at most that
fraction, less than running both sides costs); skip the loads when the split would save no
more than `split_cost_chunks` head chunks, what its extra steps cost; otherwise a hint of where
the two sides should meet, so the compute service can take the head up to there in large steps
and go chunk by chunk only near the meeting. The meeting point itself is still found at run time.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

STALE_HOPE = 0.7  # the link estimate's factor per request computed whole without loads
CHUNKS_PER_SAMPLE = 4  # a telemetry window that read more chunks weighs as more than one sample


def window_weight(chunks: int) -> float:
    """Samples a telemetry window of `chunks` loads counts as: one, or chunks /
    CHUNKS_PER_SAMPLE when more."""
    return max(1.0, chunks / CHUNKS_PER_SAMPLE)


@dataclass
class Ewma:
    """An exponentially weighted moving average of positive samples, taken over their
    logarithms (a geometric mean): a link that turns 16x faster moves it as far as one that
    turns 16x slower, where a plain average would stay near the slow value for many samples.
    None until the first sample."""

    alpha: float = 0.5
    value: float | None = None

    def add(self, sample: float, weight: float = 1.0) -> None:
        """Fold in a sample (> 0) that counts as `weight` samples of that value in a row."""
        if self.value is None:
            self.value = sample
        else:
            alpha = 1 - (1 - self.alpha) ** weight
            self.value = math.exp(alpha * math.log(sample) + (1 - alpha) * math.log(self.value))


@dataclass(frozen=True)
class Advice:
    """What the estimate suggests for one request."""

    compute_head: bool = True
    head_hint: int = -1  # predicted meeting chunk; -1: no estimate yet
    fetch: bool = True  # False: compute the whole hit (too few chunks for loads to pay off)


@dataclass
class SplitEstimator:
    """EWMAs of the two sides' per-chunk costs, and the advice they give."""

    compute_s: Ewma = field(default_factory=Ewma)  # seconds to compute one head chunk
    load_s: Ewma = field(default_factory=Ewma)  # seconds per chunk the link delivers
    near_load_s: Ewma = field(default_factory=Ewma)  # the same for the near tier, if any
    skip_head_ratio: float = 0.35
    split_cost_chunks: float = 4.0  # a split's cost over one prefill, in head chunks
    seen_multi_chunk_step: bool = False
    seeded: bool = False  # compute_s holds a chunk's cost measured when the model loaded

    def seed_compute(self, seconds: float) -> None:
        """A chunk's cost in a large head step, measured when the model loaded: the estimate
        until a multi-chunk step is seen, in place of any single-chunk steps heard before it."""
        if seconds > 0 and not self.seen_multi_chunk_step:
            self.compute_s.value, self.seeded = seconds, True

    def observe_compute(self, chunks: int, seconds: float) -> None:
        """A head step computed `chunks` chunks in `seconds`.

        Single-chunk steps (the slow, precise ones near the meeting point: a whole step's
        overhead for one chunk) only count while nothing better is known, neither a
        multi-chunk step nor the seed: the hint and the skip are about large steps.
        """
        single = chunks == 1 and (self.seen_multi_chunk_step or self.seeded)
        if chunks <= 0 or seconds <= 0 or single:
            return
        self.seen_multi_chunk_step |= chunks > 1
        self.compute_s.add(seconds / chunks)

    def observe_loads(self, chunks: int, seconds: float) -> None:
        """The link delivered `chunks` chunks in `seconds`: one sample, or chunks /
        CHUNKS_PER_SAMPLE when more, so a request's dozen loads all but replace the estimate.
        A link that rose 16x is believed after one request; with one sample a window, the next
        request still split on the old link. A window of few reads still counts one sample:
        on a slow link a split's few loads are as telling as a fast link's many."""
        if chunks > 0 and seconds > 0:
            self.load_s.add(seconds / chunks, window_weight(chunks))

    def observe_near_loads(self, chunks: int, seconds: float) -> None:
        """The near tier delivered `chunks` chunks in `seconds` (weighed as observe_loads)."""
        if chunks > 0 and seconds > 0:
            self.near_load_s.add(seconds / chunks, window_weight(chunks))

    def link_stalled(self, seconds: float) -> None:
        """A fetch made no progress for `seconds`: one sample of that pace a chunk."""
        self.load_s.add(seconds)

    def skip_was_wrong(self, pace_s: float) -> None:
        """A load-only plan had to compute the head after all: its loads came a chunk every
        `pace_s` or slower. The link estimate takes that pace at once (one already slower
        stays): averaged in as one more sample it could still advise the next request to skip
        the head, as it did for two requests after a link dropped from 4x to 1x
        (scripts/replay.py link-step)."""
        if pace_s > 0:
            self.load_s.value = max(self.load_s.value or 0.0, pace_s)

    def loads_unobserved(self) -> None:
        """A request was computed whole without loads, so it said nothing of the link: the
        link estimate grows more hopeful (STALE_HOPE), so that a link that got faster while
        nobody loaded is tried again after a few such requests instead of never."""
        if self.load_s.value is not None:
            self.load_s.value *= STALE_HOPE

    def advise(self, hit: int, near: Collection[int] = ()) -> Advice:
        """Advice for a request with `hit` loadable chunks, of which those in `near` are in
        the near tier (each tier's chunks at its own pace)."""
        compute, far = self.compute_s.value, self.load_s.value
        if hit == 0 or compute is None or far is None:
            return Advice()
        near_s = self.near_load_s.value
        if not near or near_s is None:  # one link (a near tier not yet measured counts as far)
            return self._advise(hit, compute, far, math.ceil(hit * far / (compute + far)))
        loads = [near_s if j in near else far for j in range(hit)]
        meet, _ = best_meet(hit, compute, loads, near)
        near_sum = sum(loads[j] for j in range(hit) if j in near)
        every_load = max(near_sum, sum(loads) - near_sum)  # all of them, side by side
        return self._advise(hit, compute, every_load / hit, meet)

    def _advise(self, hit: int, compute: float, load: float, hint: int) -> Advice:
        """Advice from a chunk's compute cost, its load cost and the split they suggest."""
        if load < self.skip_head_ratio * compute:
            return Advice(compute_head=False, head_hint=0)
        if hit * compute / (compute + load) <= self.split_cost_chunks:  # head chunks it saves
            return Advice(head_hint=hit, fetch=False)
        return Advice(head_hint=min(hit, hint))


def best_meet(
    hit: int, compute: float, loads: Sequence[float], near: Collection[int]
) -> tuple[int, float]:
    """The meeting chunk m that minimises max(m * compute, the loads of [m, hit)), the near
    tier's and the far one's read side by side (the slower of their two sums); its time (ties go
    to the larger m: fewer loads)."""
    best = (hit, hit * compute)
    near_tail = far_tail = 0.0
    for m in range(hit - 1, -1, -1):  # the tail grows as the meeting point comes down
        if m in near:
            near_tail += loads[m]
        else:
            far_tail += loads[m]
        seconds = max(m * compute, near_tail, far_tail)
        if seconds < best[1]:
            best = (m, seconds)
    return best
