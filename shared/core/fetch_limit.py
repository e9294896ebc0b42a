"""How many chunk reads a loader node runs at once: additive increase, multiplicative decrease.

As TCP and object-store clients do: while reads come back as fast as the fastest seen lately
(per byte), the limit grows by about one per round of `limit` reads, so a store whose reads
are latency-bound (S3: each GET waits, many fit side by side) gets more of them; when reads
slow to SLOW_FACTOR times that pace (they queue on a link or a disk that is full) the limit
shrinks by BACKOFF, at most once a round; an error or a timeout halves it. All requests of
the node share it. Pure logic: the loader's gate enforces it.
"""

from __future__ import annotations

from dataclasses import dataclass

SLOW_FACTOR = 1.5  # a read this much slower per byte than the recent best: the store is queueing
BACKOFF = 0.8  # the limit's cut on slow reads (errors halve it)
FLOOR_DRIFT = 0.005  # the recent best pace forgets this fraction per read (links change)


@dataclass
class FetchLimit:
    """The node's concurrent-read limit and what it learned of the store's pace."""

    limit: float
    max_limit: int
    min_limit: int = 1
    best_s_per_mb: float | None = None  # the fastest recent pace
    since_cut: int = 0  # reads since the last cut (a round is `limit` reads)

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.limit <= self.max_limit:
            raise ValueError("need 1 <= min_limit <= limit <= max_limit")

    @property
    def slots(self) -> int:
        """Reads that may run at once now."""
        return max(self.min_limit, int(self.limit))

    def on_read(self, seconds: float, nbytes: int) -> None:
        """A read of nbytes took seconds."""
        if nbytes <= 0 or seconds <= 0:
            return
        pace = seconds / (nbytes / 1e6)
        best = self.best_s_per_mb
        self.best_s_per_mb = pace if best is None else min(pace, best * (1 + FLOOR_DRIFT))
        self.since_cut += 1
        if best is not None and pace > SLOW_FACTOR * best:
            self._cut(BACKOFF)
        else:
            self.limit = min(self.max_limit, self.limit + 1 / self.limit)

    def on_failure(self) -> None:
        """A read failed or timed out."""
        self.since_cut = self.slots  # always counts
        self._cut(0.5)

    def _cut(self, factor: float) -> None:
        if self.since_cut >= self.slots:  # at most once a round
            self.limit = max(float(self.min_limit), self.limit * factor)
            self.since_cut = 0
