"""The compute step budget steered to a target inter-token latency (CAKE_TARGET_ITL_MS).

A step that carries decode tokens is an inter-token gap for every request decoding in it. When
such a step takes longer than the target, the budget (tokens per step) is cut by BACKOFF, so
prompt work comes in smaller pieces; while such steps stay under it, the budget grows back by
one granule (a chunk) a step, up to CAKE_TOKEN_BUDGET, so prefill throughput is as high as the
target allows. Steps without decodes hold nobody's tokens back: they run at the full budget
and teach nothing. Pure logic: compute's scheduler loop applies it.

`TokenPace` is what a prompt token costs in a step, so that a step can be sized to end when a
request waiting for its loads can go on (compute's `due_budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

BACKOFF = 0.7  # the budget's cut after a decode step over the target


@dataclass
class StepBudget:
    """Prompt tokens per step while requests decode, between one granule and the configured
    most (compute adds a token for each decode, so a whole chunk always fits beside them)."""

    target_s: float
    granule: int  # prompt pieces are whole chunks: the budget moves in chunks
    most: int
    tokens: int = 0  # the budget for steps with decodes (0: start at the most)

    def __post_init__(self) -> None:
        if not (self.target_s > 0 and 0 < self.granule <= self.most):
            raise ValueError("need target_s > 0 and 0 < granule <= most")
        self.tokens = self.tokens or self.most

    def for_step(self, decoding: bool) -> int:
        """The budget of the next step (the full one when nobody decodes)."""
        return self.tokens if decoding else self.most

    def observe(self, seconds: float, decoded: bool) -> None:
        """A step ran for `seconds`; `decoded`: it carried decode tokens."""
        if not decoded:
            return
        if seconds > self.target_s:
            cut = int(self.tokens * BACKOFF) // self.granule * self.granule
            self.tokens = max(self.granule, cut)
        else:
            self.tokens = min(self.most, self.tokens + self.granule)


PACE_WEIGHT = 0.5  # the newest step's weight in TokenPace's moving averages


def moved(average: float | None, sample: float) -> float:
    """A moving average with the newest sample at PACE_WEIGHT (the sample, at first)."""
    return sample if average is None else average + PACE_WEIGHT * (sample - average)


@dataclass
class TokenPace:
    """Seconds a prompt token costs in a step: a moving average over the steps that ran
    (attention makes tokens further into a prompt dearer, so the recent steps count most)."""

    seconds: float | None = None  # per prompt token; None until a step or a measurement
    chunk_step_s: float | None = None  # a step of one chunk of prompt work, overhead and all

    def observe(self, seconds: float, tokens: int, chunk: int = 0) -> None:
        """A step ran `tokens` prompt tokens (and perhaps decodes) in `seconds`; `chunk`: the
        tokens of a chunk, when a step of just that many is a one-chunk step."""
        if tokens <= 0:
            return
        self.seconds = moved(self.seconds, seconds / tokens)
        if tokens == chunk:
            self.chunk_step_s = moved(self.chunk_step_s, seconds)

    def tokens_within(self, seconds: float, granule: int) -> int | None:
        """Prompt tokens a step can run in `seconds` (whole granules, one at least); None
        while the pace is unknown."""
        if self.seconds is None or self.seconds <= 0:
            return None
        return max(granule, int(seconds / self.seconds) // granule * granule)
