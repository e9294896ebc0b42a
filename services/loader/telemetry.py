"""The loader's telemetry window: what its reads did since the last LoaderTelemetry."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.loader.gate import ReadGate
from shared.storage.base import FAR, NEAR
from shared.storage.tiered import TierReads
from shared.wire.messages import LoaderTelemetry


@dataclass
class ReadWindow:
    """Reads, bytes, read time, stalls and failures since the window opened."""

    opened: float = field(default_factory=time.monotonic)
    reads: int = 0
    nbytes: int = 0
    read_s: float = 0.0
    stalls: int = 0
    failures: int = 0

    def read(self, seconds: float, nbytes: int) -> None:
        """A chunk read finished."""
        self.reads += 1
        self.nbytes += nbytes
        self.read_s += seconds

    def failed(self, stalled: bool) -> None:
        """A chunk read failed (stalled: past the fetch timeout)."""
        self.stalls += stalled
        self.failures += not stalled

    def message(
        self,
        node: str,
        gate: ReadGate,
        tiers: dict[str, TierReads] | None = None,
        store_problem: str = "",
    ) -> LoaderTelemetry:
        """The window, closed now, as a message (with the gate's busy time since the last,
        what each tier served when the store has two, and the store's write problem)."""
        near = tiers[NEAR] if tiers else TierReads()
        return LoaderTelemetry(
            node=node, window_s=time.monotonic() - self.opened, reads=self.reads,
            nbytes=self.nbytes, read_s=self.read_s / self.reads if self.reads else 0.0,
            busy_s=gate.take_busy_s(), in_flight=gate.in_flight, read_limit=gate.limit.slots,
            stalls=self.stalls, failures=self.failures, near_reads=near.reads,
            near_nbytes=near.nbytes, near_busy_s=near.busy_s,
            far_reads=tiers[FAR].reads if tiers else 0,
            far_busy_s=tiers[FAR].busy_s if tiers else None, store_problem=store_problem,
        )  # fmt: skip
