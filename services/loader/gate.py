"""The node-wide gate on chunk reads: at most the FetchLimit's slots at once, whatever the
number of requests fetching (the limit moves as reads come back)."""

from __future__ import annotations

import asyncio

from shared.core.fetch_limit import FetchLimit


class ReadGate:
    """Admits reads while fewer than limit.slots are in flight; waiters go in arrival order."""

    def __init__(self, limit: FetchLimit) -> None:
        self.limit = limit
        self.in_flight = 0
        self.changed = asyncio.Condition()

    async def acquire(self) -> None:
        """Wait for a slot."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.in_flight < self.limit.slots)
            self.in_flight += 1

    async def release(self) -> None:
        """Give a slot back (and let waiters see a limit that may have grown)."""
        async with self.changed:
            self.in_flight -= 1
            self.changed.notify_all()
