"""Run awaitables together, all or nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def all_of(awaitables: Sequence[Awaitable[T]]) -> list[T]:
    """Their results, in order, run together; the first failure cancels the rest (and waits for
    them to end) and is raised."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
