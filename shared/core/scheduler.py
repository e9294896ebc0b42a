"""The compute scheduler's decision, as pure logic: what runs in the next step.

Each step has a token budget given out in priority order: decode tokens first, then prefill of
requests with nothing to load (no hit, or the meeting point already known), then the head
chunks of Cake requests that are still racing their loader (the paper's order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum


class Phase(IntEnum):
    """Where a request is; the value is its scheduling priority (lower runs first)."""

    DECODE = 0
    PREFILL = 1  # tokens that must be computed: no hit, or after the meeting point
    HEAD = 2  # Cake head chunks racing the loader
    WAITING = 3  # load-only request waiting for the meeting point
    FINISHED = 4


@dataclass(frozen=True)
class Candidate:
    """A request's next piece of work as the scheduler sees it."""

    request_id: str
    phase: Phase
    tokens: int  # tokens the next piece computes (1 for a decode step)
    arrival: float


def plan_step(candidates: Sequence[Candidate], budget: int) -> list[Candidate]:
    """The pieces to run this step: by priority then arrival, within the token budget.

    The first piece always runs, even when larger than the budget, so nothing starves.
    """
    runnable = [c for c in candidates if c.phase < Phase.WAITING]
    runnable.sort(key=lambda c: (c.phase, c.arrival))
    chosen: list[Candidate] = []
    used = 0
    for c in runnable:
        if chosen and used + c.tokens > budget:
            continue
        chosen.append(c)
        used += c.tokens
    return chosen
