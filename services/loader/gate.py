"""The node-wide gate on chunk reads: at most the FetchLimit's slots at once, whatever the
number of requests fetching (the limit moves as reads come back). It also keeps the time the
node spent with at least one read in flight (the telemetry's busy_s)."""

from __future__ import annotations

import asyncio
import time

from shared.core.fetch_limit import FetchLimit


class ReadGate:
    """Admits reads while fewer than limit.slots are in flight; waiters go in arrival order."""

    def __init__(self, limit: FetchLimit) -> None:
        self.limit = limit
        self.in_flight = 0
        self.changed = asyncio.Condition()
        self._busy_s = 0.0  # busy time not yet taken (take_busy_s)
        self._busy_since: float | None = None  # when the current busy stretch began
        self._idle_since = time.monotonic()  # when the last read ended (or the gate opened)
        self.admitted = 0  # reads admitted so far

    async def acquire(self) -> None:
        """Wait for a slot."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.in_flight < self.limit.slots)
            if self.in_flight == 0:
                self._busy_since = time.monotonic()
            self.in_flight += 1
            self.admitted += 1

    async def release(self) -> None:
        """Give a slot back (and let waiters see a limit that may have grown)."""
        async with self.changed:
            self.in_flight -= 1
            if self.in_flight == 0 and self._busy_since is not None:
                self._idle_since = time.monotonic()
                self._busy_s += self._idle_since - self._busy_since
                self._busy_since = None
            self.changed.notify_all()

    def idle_s(self) -> float:
        """Seconds since the last read ended (0 while one is in flight)."""
        return 0.0 if self.in_flight else time.monotonic() - self._idle_since

    def take_busy_s(self) -> float:
        """Seconds with a read in flight since the last call (a stretch still going counts up
        to now)."""
        now = time.monotonic()
        busy, self._busy_s = self._busy_s, 0.0
        if self._busy_since is not None:
            busy += now - self._busy_since
            self._busy_since = now
        return busy
