"""The compute replica's telemetry window: its steps and Cake head chunks since the last
ComputeTelemetry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.compute.metrics import KINDS
from shared.wire.messages import ComputeTelemetry


@dataclass
class StepWindow:
    """Steps, tokens by kind and head chunks (with their cost, queueing included)."""

    opened: float = field(default_factory=time.monotonic)
    steps: int = 0
    step_s: float = 0.0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS.values(), 0))
    head_chunks: int = 0  # in head pieces of several chunks
    head_s: float = 0.0
    single_chunks: int = 0  # in one-chunk head pieces (near a meeting point: dearer per token)
    single_s: float = 0.0

    def step(self, seconds: float, tokens: dict[str, int]) -> None:
        """A step ran for `seconds`, computing these tokens by kind."""
        self.steps += 1
        self.step_s += seconds
        for kind, n in tokens.items():
            self.tokens[kind] = self.tokens.get(kind, 0) + n

    def head(self, chunks: int, seconds: float) -> None:
        """A Cake head computed `chunks` chunks, `seconds` after it was last ready to."""
        if chunks > 1:
            self.head_chunks += chunks
            self.head_s += seconds
        else:
            self.single_chunks += chunks
            self.single_s += seconds

    def message(
        self, node: str, running: int, waiting: int, pool_bytes: int, budget_bytes: int
    ) -> ComputeTelemetry:
        """The window, closed now, as a message. Its head cost is that of multi-chunk pieces
        when there were any (what a planned head step costs), else of single chunks."""
        chunks, seconds = (
            (self.head_chunks, self.head_s) if self.head_chunks else
            (self.single_chunks, self.single_s)
        )  # fmt: skip
        return ComputeTelemetry(
            node=node, window_s=time.monotonic() - self.opened, steps=self.steps,
            step_s=self.step_s / self.steps if self.steps else 0.0, tokens=self.tokens,
            head_chunks=chunks, head_s=seconds, running=running, waiting=waiting,
            kv_pool_bytes=pool_bytes, kv_budget_bytes=budget_bytes,
        )  # fmt: skip
