"""Request ids cancelled before their work arrived: a Cancel can overtake its job on NATS."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class RecentlyCancelled:
    """Remembers cancelled request ids for keep_s seconds."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._ids: OrderedDict[str, float] = OrderedDict()  # oldest first

    def add(self, request_id: str) -> None:
        """Remember one id (and forget the ones older than keep_s)."""
        now = time.monotonic()
        while self._ids and now - next(iter(self._ids.values())) >= self.keep_s:
            self._ids.popitem(last=False)
        self._ids[request_id] = now
        self._ids.move_to_end(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def owned(self, table: Mapping[str, T], request_id: str, is_cancel: bool) -> T | None:
        """The entry a control message is for; a Cancel for an unknown id is remembered."""
        entry = table.get(request_id)
        if entry is None and is_cancel:
            self.add(request_id)
        return entry
