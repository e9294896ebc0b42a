"""A compute job's phase as its loads arrive: when a head racing them steps, and when it waits."""

from __future__ import annotations

import time

from services.compute.job import Job
from shared.core.keys import KeySpace, KVLayout, PromptChunks, pack_tokens
from shared.core.request import Sampling
from shared.core.scheduler import Phase
from shared.core.step_budget import TokenPace
from shared.wire.messages import PrefillJob, Space

CHUNK = 64


def racing_head(head_done: int, loaded: range, gap_s: float, step_s: float | None) -> Job:
    """A 10-chunk hit whose head has computed `head_done` chunks while the loads staged
    `loaded`, one every gap_s, the last 0.01 s ago; a one-chunk step costs step_s."""
    space = KeySpace("model", KVLayout(2, 2, 8, "float32"), CHUNK)
    tokens = list(range(1, 11 * CHUNK + 2))
    msg = PrefillJob(
        "r", pack_tokens(tokens), Space.of(space), 10, True, Sampling(), time.time() + 30, 5
    )
    job = Job(
        msg, PromptChunks.of(space, tokens), frozenset(), cache=object(),  # type: ignore[arg-type]
        token_pace=TokenPace(seconds=0.0005, chunk_step_s=step_s), loads_batch=4, piece=1024,
    )  # fmt: skip
    job.head_done = head_done
    now = time.monotonic()
    for k, index in enumerate(reversed(loaded)):  # the tail first
        job.loads.on_loaded(index)
        job.load_arrivals.append(now - 0.01 - gap_s * (len(loaded) - 1 - k))
    return job


def test_a_head_one_chunk_short_of_loads_due_sooner_than_its_step_waits_for_them() -> None:
    """Loads a chunk each 0.05 s have reached chunk 5; the head is at 4. The next load is due
    in 0.04 s, a one-chunk step would take 0.08 s: the head waits, and the step loop wakes
    when the wait ends (0.12 s at most). With a step cheaper than the wait, it steps."""
    job = racing_head(4, range(5, 10), 0.05, step_s=0.08)
    assert job.phase() == Phase.WAITING
    wait = job.waits_for_loads(time.monotonic())
    assert wait is not None and 0.1 < wait <= 0.12
    assert job.awaits_merger()  # the merger's Meet ends it, as for loads that reached the head
    assert job.waits_for_its_loads()  # (cake_compute_heads_waiting_for_loads counts it)
    assert racing_head(4, range(5, 10), 0.05, step_s=0.03).phase() == Phase.HEAD
    assert not racing_head(4, range(5, 10), 0.05, step_s=0.03).waits_for_its_loads()
    reached = racing_head(4, range(4, 10), 0.05, step_s=0.08)  # the loads reached the head
    assert reached.phase() == Phase.WAITING and not reached.waits_for_its_loads()
    assert racing_head(4, range(5, 10), 0.05, step_s=None).phase() == Phase.HEAD  # not known
    assert racing_head(2, range(5, 10), 0.05, step_s=0.08).phase() == Phase.HEAD  # 3 short


class Held:
    """A cache that holds `n` tokens (what a candidate reads of it)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def test_only_a_prompt_ending_in_loaded_chunks_runs_whole_as_one() -> None:
    """The step ending a prompt that used loaded chunks runs whole (finish first); one that met
    at its hit's end after its loads failed is a plain prefill, cut like any other."""
    job = racing_head(4, range(5, 10), 0.05, step_s=0.08)
    job.cache = Held(10 * CHUNK)  # type: ignore[assignment]
    job.merged, job.meet = True, 4
    assert job.candidate().ends_loaded_prompt
    job.meet = job.hit
    assert not job.candidate().ends_loaded_prompt


def test_only_staged_chunks_the_head_will_not_compute_are_placed() -> None:
    """Chunks staged past the computed head are placed as they arrive; once the Meet says
    where loads begin, one that landed below it is the head's to compute and is left alone."""
    job = racing_head(2, range(5, 10), 0.05, step_s=None)
    job.staged = {j: f"c{j}" for j in (1, 4, 6, 7, 8)}
    job.placed = {8}
    assert job.placeable() == [4, 6, 7]
    job.meet = 6
    assert job.placeable() == [6, 7]
    job.head_done = 7
    assert job.placeable() == [7]
