"""Admission by projected KV memory, as pure logic: who runs, who waits, who is turned away.

A request's projected need is the KV of its prompt plus its max_tokens. Requests run while the
needs of the running ones fit the memory budget; the others wait in arrival order in a bounded
queue. When the queue is full, a new request is refused with a hint of when to retry (the
gateway answers 429 with Retry-After); a request that could never fit is refused outright.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from shared.core.errors import CakeError, ErrorCode

RUN_TIME_ALPHA = 0.2  # weight of the newest run in the mean run time (Retry-After)


class Overloaded(CakeError):
    """Every slot of the waiting queue is taken: try again after retry_after_s."""

    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(CakeError):
    """The request needs more KV memory than the whole budget."""

    code = ErrorCode.TOO_LARGE


@dataclass
class Admission:
    """The running and waiting requests of one compute replica, by projected KV bytes."""

    budget_bytes: int
    max_waiting: int
    running: dict[str, int] = field(default_factory=dict)  # request id -> projected bytes
    waiting: OrderedDict[str, int] = field(default_factory=OrderedDict)  # arrival order
    mean_run_s: float = 1.0  # how long a request runs, on average (for Retry-After)

    @property
    def reserved_bytes(self) -> int:
        """Projected KV bytes of the running requests."""
        return sum(self.running.values())

    def offer(self, request_id: str, need_bytes: int) -> bool:
        """Take a request: True when it runs now, False when it waits; TooLarge or Overloaded
        when it is refused."""
        if need_bytes > self.budget_bytes:
            raise TooLarge(
                f"the request needs {need_bytes / 2**20:.0f} MiB of KV memory, more than the "
                f"whole budget ({self.budget_bytes / 2**20:.0f} MiB); shorten the prompt or "
                "lower max_tokens"
            )
        if not self.waiting and self.reserved_bytes + need_bytes <= self.budget_bytes:
            self.running[request_id] = need_bytes
            return True
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(
                f"the server is busy ({len(self.running)} running, {len(self.waiting)} "
                "waiting); try again later",
                self.retry_after_s(),
            )
        self.waiting[request_id] = need_bytes
        return False

    def release(self, request_id: str, ran_s: float | None = None) -> list[str]:
        """A request ended (or left the queue; ran_s: how long it was in the system); the
        waiting ones that now run, in order."""
        if ran_s is not None:
            self.mean_run_s += RUN_TIME_ALPHA * (ran_s - self.mean_run_s)
        self.running.pop(request_id, None)
        self.waiting.pop(request_id, None)
        started = []
        while self.waiting:
            rid, need = next(iter(self.waiting.items()))
            if self.reserved_bytes + need > self.budget_bytes:
                break
            self.waiting.popitem(last=False)
            self.running[rid] = need
            started.append(rid)
        return started

    def retry_after_s(self) -> float:
        """Seconds until a slot in the queue is likely free (at least one)."""
        ahead = len(self.waiting) + 1
        return float(max(1, math.ceil(self.mean_run_s * ahead / max(1, len(self.running)))))
