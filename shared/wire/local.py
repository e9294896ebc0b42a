"""An in-process connection for the bus: NATS semantics (subjects with `*` and `>` wildcards,
queue groups, request/reply, no responders) inside one event loop.

It lets the very same services run in one process (the benchmark's pipeline-overhead baseline
and library use), so what differs from a deployment is only NATS and the process boundaries.
Messages are still encoded and decoded, exactly as on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from shared.core.errors import ConnectionLost, NoResponders, PayloadTooLarge, RequestTimeout
from shared.wire.bus import RawMsg

MAX_PAYLOAD = 8 * 1024 * 1024  # as the embedded nats-server is configured


@dataclass
class LocalMsg:
    """One delivered message."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str = ""


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, `>` one or more trailing tokens."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


@dataclass(eq=False)
class LocalSubscription:
    """Messages for one subscriber, queued in arrival order."""

    broker: LocalBroker
    pattern: str
    queue: str
    messages: asyncio.Queue[LocalMsg | None] = field(default_factory=asyncio.Queue)  # None: closed
    worker: asyncio.Task[None] | None = None
    owner: set[LocalSubscription] | None = None  # the connection's set, left on unsubscribe

    @property
    def subject(self) -> str:
        """What it subscribes to."""
        return self.pattern

    async def next_msg(self, timeout: float) -> RawMsg:
        """The next message; RequestTimeout when none came in time."""
        try:
            msg = await asyncio.wait_for(self.messages.get(), timeout)
        except TimeoutError:
            raise RequestTimeout(f"nothing arrived within {timeout:g}s") from None
        if msg is None:
            raise ConnectionLost("the in-process connection is closed")
        return msg

    async def drain(self) -> None:
        """Take no more messages; the callback finishes the ones already queued."""
        self.broker.remove(self)
        if self.worker is not None:
            await self.messages.join()
        await self.unsubscribe()

    async def unsubscribe(self) -> None:
        """Stop receiving at once (a callback in progress is cancelled)."""
        self.broker.remove(self)
        if self.owner is not None:
            self.owner.discard(self)
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)


class LocalBroker:
    """The subjects and subscriptions of one process."""

    def __init__(self) -> None:
        self.subscriptions: list[LocalSubscription] = []
        self._turn = itertools.count()

    def add(self, pattern: str, queue: str) -> LocalSubscription:
        """A new subscription."""
        sub = LocalSubscription(self, pattern, queue)
        self.subscriptions.append(sub)
        return sub

    def remove(self, sub: LocalSubscription) -> None:
        """Forget a subscription (missing is fine)."""
        with contextlib.suppress(ValueError):
            self.subscriptions.remove(sub)

    def deliver(self, msg: LocalMsg) -> int:
        """Hand msg to every plain subscriber and one member of each queue group; how many."""
        groups: dict[str, list[LocalSubscription]] = {}
        for sub in self.subscriptions:
            if matches(sub.pattern, msg.subject):
                groups.setdefault(sub.queue or f"\0{id(sub)}", []).append(sub)
        turn = next(self._turn)
        for members in groups.values():
            members[turn % len(members)].messages.put_nowait(msg)
        return len(groups)


class LocalConnection:
    """One service's connection to a LocalBroker."""

    def __init__(self, broker: LocalBroker) -> None:
        self.broker = broker
        self._subs: set[LocalSubscription] = set()
        self._closed = False

    @property
    def connected(self) -> bool:
        """Until closed."""
        return not self._closed

    @property
    def max_payload(self) -> int:
        """As a NATS server configured like the embedded one."""
        return MAX_PAYLOAD

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost("the in-process connection is closed")

    def _check_sendable(self, data: bytes) -> None:
        self._check_open()
        if len(data) > MAX_PAYLOAD:
            raise PayloadTooLarge(f"a message of {len(data)} bytes exceeds {MAX_PAYLOAD} bytes")

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], reply: str = ""
    ) -> None:
        """Deliver one message."""
        self._check_sendable(data)
        self.broker.deliver(LocalMsg(subject, data, dict(headers), reply))

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str], timeout_s: float
    ) -> RawMsg:
        """Send and wait for one reply."""
        self._check_sendable(data)
        inbox = self.broker.add(f"_INBOX.{uuid.uuid4().hex}", "")
        try:
            if not self.broker.deliver(LocalMsg(subject, data, dict(headers), inbox.pattern)):
                raise NoResponders(f"nobody listens on {subject}")
            try:
                return await inbox.next_msg(timeout_s)
            except RequestTimeout:
                raise RequestTimeout(f"no answer on {subject} within {timeout_s:g}s") from None
        finally:
            self.broker.remove(inbox)

    async def subscribe(
        self, subject: str, queue: str, callback: Callable[[RawMsg], Awaitable[None]]
    ) -> LocalSubscription:
        """Deliver each message to callback, one at a time."""
        self._check_open()
        sub = self.broker.add(subject, queue)

        async def work() -> None:
            while (msg := await sub.messages.get()) is not None:
                try:
                    await callback(msg)
                finally:
                    sub.messages.task_done()

        sub.worker = asyncio.ensure_future(work())
        return self._own(sub)

    async def inbox(self, subject: str) -> LocalSubscription:
        """A subscription to read with next_msg."""
        self._check_open()
        return self._own(self.broker.add(subject, ""))

    def _own(self, sub: LocalSubscription) -> LocalSubscription:
        self._subs.add(sub)
        sub.owner = self._subs
        return sub

    async def flush(self) -> None:
        """Delivery is immediate: let callbacks run."""
        await asyncio.sleep(0)

    async def announce(self, name: str, metadata: dict[str, str]) -> Callable[[], Awaitable[None]]:
        """Nobody discovers services in one process: nothing to answer."""

        async def stop() -> None:
            pass

        return stop

    async def close(self, timeout_s: float) -> None:
        """Stop taking messages, let callbacks finish what is queued, then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            self.broker.remove(sub)
        workers = [s for s in self._subs if s.worker is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(s.messages.join() for s in workers)), timeout_s)
        for sub in workers:
            await sub.unsubscribe()
        for sub in list(self._subs):  # readers waiting on an inbox hear that it is closed
            sub.messages.put_nowait(None)
