"""The compute scheduler's decision, as pure logic: what runs in the next step.

Each step has a token budget. Decode tokens come first, up to their share of the budget
(`decode_share`, as in Sarathi-Serve's stall-free batching: a long prefill never stalls
decoding, and decodes never take the whole step while a prompt waits). The rest goes to prefill
of requests with nothing to load (no hit, or the meeting point known), then to the head chunks
of Cake requests still racing their loader (the paper's order); first come, first served within
a class. A piece that does not fit is cut to what is left (in whole granules: storage chunks,
so a head stays aligned with what is stored), never skipped whole while a granule fits.
Requests that have waited `aging_steps` steps each get one granule first (longest-waiting
first), so every runnable request progresses within a bounded number of steps however much
higher-priority work keeps arriving.

With `finish_first`, a Cake request's prompt runs first come, first served, as a compute-only
prompt computed in one step does: head pieces racing their loads queue with prefills by arrival
instead of after them, and while one (or a piece that ends a prompt that waited for its loads,
so that its first token comes out of this step) is granted whole, requests that came after it
wait, apart from other such pieces (a later prompt would otherwise stretch the step by its own
length while the loads go on arriving). Older prompt pieces beside a piece that ends a loaded
prompt are cut to its size, so a short suffix after the loads does not wait for a long prefill
that happens to share its step. Aging still gives a waiting request its granule.
`prompt_cap` bounds the prompt tokens of a step apart from its decodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

DEFAULT_DECODE_SHARE = 0.5
DEFAULT_AGING_STEPS = 8


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
    tokens: int  # tokens the next piece wants (1 for a decode step)
    arrival: float
    granule: int = 1  # a cut piece is a whole number of these tokens
    waited: int = 0  # steps since the request last ran while runnable
    ends_loaded_prompt: bool = False  # run whole, it ends a prompt that waited for its loads
    races_loads: bool = False  # a head racing its loads (finish_first: by arrival, cuts later)


@dataclass(frozen=True)
class Piece:
    """What one request runs in this step."""

    request_id: str
    phase: Phase
    tokens: int  # granted: the whole want, or a cut of it in whole granules


def plan_step(
    candidates: Sequence[Candidate],
    budget: int,
    decode_share: float = DEFAULT_DECODE_SHARE,
    aging_steps: int = DEFAULT_AGING_STEPS,
    finish_first: bool = False,
    prompt_cap: int | None = None,
) -> list[Piece]:
    """The pieces to run this step, within the token budget (see the module's docstring).

    When nothing else would run, the first piece runs whole even if larger than the budget.
    """
    runnable = [c for c in candidates if c.phase < Phase.WAITING and c.tokens > 0]
    decodes = sorted((c for c in runnable if c.phase == Phase.DECODE), key=_longest_waiting)
    others = sorted(
        (c for c in runnable if c.phase != Phase.DECODE),
        key=_by_arrival_with_heads if finish_first else _priority,
    )
    grants = {
        c.request_id: 1
        for c in decodes[: _decode_cap(decodes, others, budget, decode_share, aging_steps)]
    }
    left = budget - len(grants)
    left = left if prompt_cap is None else min(left, prompt_cap)
    aged = sorted((c for c in others if c.waited >= aging_steps), key=_longest_waiting)
    for c in aged:  # first a granule each for the requests that waited longest
        share = min(c.tokens, c.granule)
        if share <= left:
            grants[c.request_id] = share
            left -= share
    for c in others:  # then the rest of the budget by priority and arrival
        more = _fit(c.tokens - grants.get(c.request_id, 0), left, c.granule)
        if more > 0:
            grants[c.request_id] = grants.get(c.request_id, 0) + more
            left -= more
    if not grants and runnable:  # a granule larger than the budget: run it rather than stall
        grants[(decodes or others)[0].request_id] = (decodes or others)[0].tokens
    if finish_first:
        _first_come_first(grants, others, aging_steps)
    phase = {c.request_id: c.phase for c in runnable}
    return [Piece(rid, phase[rid], tokens) for rid, tokens in grants.items()]


def _decode_cap(
    decodes: Sequence[Candidate],
    others: Sequence[Candidate],
    budget: int,
    decode_share: float,
    aging_steps: int,
) -> int:
    """How many decode tokens this step takes: all while no prompt waits; else their share,
    leaving room for one granule of prompt work unless the decodes have waited too long."""
    if not others:
        return budget
    share = math.ceil(budget * decode_share)
    if any(c.waited >= aging_steps for c in decodes):
        return share
    smallest = min(c.granule for c in others)
    return min(share, budget - smallest) if smallest <= budget else share


def _first_come_first(grants: dict[str, int], others: Sequence[Candidate], aging: int) -> None:
    """Beside a head racing its loads or a piece ending a loaded prompt, granted whole: drop the
    pieces of requests that came after the first of them, apart from other racing or ending
    pieces (a granule stays for one that waited `aging` steps); cut every other piece larger
    than the smallest ending piece to its size (in whole granules, one at least)."""
    whole = [
        c for c in others
        if (c.races_loads or c.ends_loaded_prompt) and grants.get(c.request_id) == c.tokens
    ]  # fmt: skip
    if not whole:
        return
    first = min(c.arrival for c in whole)
    cap = min((c.tokens for c in whole if c.ends_loaded_prompt), default=None)
    for c in others:
        granted = grants.get(c.request_id, 0)
        if c.arrival > first and not (c.races_loads or c.ends_loaded_prompt):
            grants[c.request_id] = min(granted, c.granule if c.waited >= aging else 0)
        elif cap is not None and granted > cap:
            grants[c.request_id] = max(min(granted, c.granule), cap // c.granule * c.granule)
    for rid in [rid for rid, tokens in grants.items() if not tokens]:
        del grants[rid]


def _fit(want: int, left: int, granule: int) -> int:
    """All of want if it fits, else the whole granules that do."""
    return want if want <= left else left // granule * granule


def _longest_waiting(c: Candidate) -> tuple[int, float]:
    return (-c.waited, c.arrival)


def _priority(c: Candidate) -> tuple[int, float]:
    return (int(c.phase), c.arrival)


def _by_arrival_with_heads(c: Candidate) -> tuple[int, float]:
    return (int(Phase.PREFILL if c.races_loads else c.phase), c.arrival)
