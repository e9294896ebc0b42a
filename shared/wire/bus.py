"""The message bus: Cake's conventions over a connection (NATS, or in-process for one process).

Every message is a shared.wire.messages.Message; trace context rides in the W3C traceparent
header; a handler's failure crosses the wire as an error code and description in reply headers.
Nothing outside this package touches a raw connection: services publish, request, handle and
read typed inboxes (async iterators of Envelope, each with the sender's trace context).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate

from shared.core.errors import CakeError, RemoteError, TransportError, http_status
from shared.wire.messages import Message, SchemaError

log = structlog.get_logger(__name__)

ERROR_HEADER = "Cake-Error"
ERROR_CODE_HEADER = "Cake-Error-Code"
RETRY_AFTER_HEADER = "Cake-Retry-After"  # seconds, when the error says when to try again

R = TypeVar("R", bound=Message)
Handler = Callable[[Message, str], Awaitable[Message | None]]  # (message, subject) -> reply


class RawMsg(Protocol):
    """What a connection delivers (nats.aio.msg.Msg has these attributes)."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str


class RawInbox(Protocol):
    """A subscription (read one message at a time, unless it has a callback)."""

    @property
    def subject(self) -> str: ...

    async def next_msg(self, timeout: float) -> RawMsg: ...  # RequestTimeout when none came

    async def unsubscribe(self) -> None: ...  # at once: a callback in progress is cancelled

    async def drain(self) -> None: ...  # take no more; let callbacks finish what is queued


class Connection(Protocol):
    """The transport under a Bus: shared.wire.nats_connection or shared.wire.local."""

    @property
    def connected(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], reply: str = ""
    ) -> None: ...

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str], timeout_s: float
    ) -> RawMsg: ...  # NoResponders, RequestTimeout

    async def subscribe(
        self, subject: str, queue: str, callback: Callable[[RawMsg], Awaitable[None]]
    ) -> RawInbox: ...  # callbacks of one subscription run one at a time

    async def inbox(self, subject: str) -> RawInbox: ...

    async def flush(self) -> None: ...

    async def announce(
        self, name: str, metadata: dict[str, str]
    ) -> Callable[[], Awaitable[None]]: ...  # answer discovery as `name`; returns its stop

    async def close(self, timeout_s: float) -> None: ...  # drain, then close; idempotent


def inject_headers() -> dict[str, str]:
    """Headers carrying the current trace context (W3C traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(headers: dict[str, str] | None) -> otel_context.Context:
    """The trace context carried in message headers (empty when there is none)."""
    return propagate.extract(dict(headers or {}))


@dataclass(frozen=True)
class Envelope:
    """A message read from an inbox, with where it came from."""

    message: Message
    subject: str
    nbytes: int  # size of the encoded message on the wire
    context: otel_context.Context  # the sender's trace context


class Inbox:
    """The messages of one subscription, decoded, as an async iterator (until closed)."""

    def __init__(self, raw: RawInbox) -> None:
        self._raw = raw

    async def next(self, timeout_s: float) -> Envelope:
        """The next readable message; RequestTimeout when none arrives within timeout_s."""
        while True:
            raw = await self._raw.next_msg(timeout=max(timeout_s, 0.001))
            try:
                message = Message.decode(raw.data)
            except SchemaError as exc:
                log.warning("unreadable message skipped", subject=raw.subject, error=str(exc))
                continue
            return Envelope(message, raw.subject, len(raw.data), extract_context(raw.headers))

    async def __aiter__(self) -> AsyncIterator[Envelope]:
        while True:
            yield await self.next(timeout_s=3600.0)

    async def close(self) -> None:
        """Stop receiving."""
        await self._raw.unsubscribe()

    async def __aenter__(self) -> Inbox:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


class Bus:
    """One connection with Cake's message conventions."""

    def __init__(self, connection: Connection) -> None:
        self._conn = connection
        self._handlers: list[RawInbox] = []
        self._in_flight: set[asyncio.Task[None]] = set()  # messages handled concurrently

    @classmethod
    async def connect(
        cls, url: str, name: str, timeout_s: float = 10.0, tls: ssl.SSLContext | None = None
    ) -> Bus:
        """A bus over NATS at url (retrying until timeout_s; reconnects forever once up; over
        TLS with a context)."""
        from shared.wire.nats_connection import NatsConnection

        return cls(await NatsConnection.open(url, name, timeout_s, tls))

    @property
    def connected(self) -> bool:
        """Whether messages can be sent now."""
        return self._conn.connected

    @property
    def max_payload(self) -> int:
        """The largest message the bus carries, in bytes."""
        return self._conn.max_payload

    async def publish(self, subject: str, message: Message) -> None:
        """Fire and forget, with the current trace context."""
        await self._conn.publish(subject, message.encode(), inject_headers())

    async def request(
        self, subject: str, message: Message, reply_type: type[R], timeout_s: float
    ) -> R:
        """Send and wait for one typed reply; NoResponders, RequestTimeout or RemoteError."""
        reply = await self._conn.request(subject, message.encode(), inject_headers(), timeout_s)
        headers = reply.headers or {}
        if ERROR_CODE_HEADER in headers:
            code, description = headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, "")
            raise RemoteError(code, description, float(headers.get(RETRY_AFTER_HEADER) or 0))
        return reply_type.decode(reply.data)

    async def handle(
        self, subject: str, handler: Handler, queue: str = "", concurrency: int = 1
    ) -> RawInbox:
        """Run handler for each message (in the sender's trace context) and answer requests.

        Messages of one subscription are handled one at a time, in order; with `concurrency`
        above 1, up to that many at once, each in its own task (in no particular order). The
        subscription is returned (to unsubscribe it alone); stop_handling() ends every one.
        """

        async def on_message(raw: RawMsg) -> None:
            token = otel_context.attach(extract_context(raw.headers))
            try:
                reply = await handler(Message.decode(raw.data), raw.subject)
                if raw.reply and reply is not None:
                    await self._conn.publish(raw.reply, reply.encode(), {})
            except Exception as exc:
                code = exc.code if isinstance(exc, CakeError) else "internal"
                if isinstance(exc, CakeError) and http_status(code) < 500:
                    log.warning("request refused", subject=raw.subject, code=code, error=str(exc))
                else:
                    log.exception("handler failed", subject=raw.subject, code=code)
                if raw.reply:
                    headers = {ERROR_CODE_HEADER: code, ERROR_HEADER: str(exc)[:1000]}
                    if isinstance(exc, CakeError) and exc.retry_after_s:
                        headers[RETRY_AFTER_HEADER] = f"{exc.retry_after_s:g}"
                    await self._conn.publish(raw.reply, b"", headers)
            finally:
                otel_context.detach(token)

        callback = on_message if concurrency <= 1 else self._concurrently(on_message, concurrency)
        sub = await self._conn.subscribe(subject, queue, callback)
        self._handlers.append(sub)
        return sub

    def handled(self) -> list[str]:
        """The subjects the handlers listen on now."""
        return [sub.subject for sub in self._handlers]

    async def unhandle(self, *subs: RawInbox) -> None:
        """Stop handlers' subscriptions (a request's, once its work is done)."""
        for sub in subs:
            if sub in self._handlers:
                self._handlers.remove(sub)
            await sub.unsubscribe()

    def _concurrently(
        self, on_message: Callable[[RawMsg], Coroutine[Any, Any, None]], limit: int
    ) -> Callable[[RawMsg], Awaitable[None]]:
        """A callback that hands each message to its own task, at most `limit` at once (the
        subscription waits while all are busy, so its messages queue in the client)."""
        slots = asyncio.Semaphore(limit)

        def finished(task: asyncio.Task[None]) -> None:
            slots.release()
            self._in_flight.discard(task)

        async def callback(raw: RawMsg) -> None:
            await slots.acquire()
            task = asyncio.create_task(on_message(raw))
            self._in_flight.add(task)
            task.add_done_callback(finished)

        return callback

    async def subscribe(self, subject: str) -> Inbox:
        """An inbox of the messages on subject (use `async with`, or close it)."""
        return Inbox(await self._conn.inbox(subject))

    async def stop_handling(self, timeout_s: float = 5.0) -> None:
        """Take no more messages for the handlers; those already taken finish (bounded), so
        their requests get their replies."""
        handlers, self._handlers = self._handlers, []
        for sub in handlers:
            try:
                await asyncio.wait_for(sub.drain(), timeout_s)
            except (TimeoutError, TransportError):
                await sub.unsubscribe()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)

    async def flush(self) -> None:
        """Until the server has seen everything sent so far."""
        await self._conn.flush()

    async def announce(self, name: str, metadata: dict[str, str]) -> Callable[[], Awaitable[None]]:
        """Answer NATS service discovery (nats.micro: $SRV.PING, $SRV.INFO, $SRV.STATS, what
        `nats micro ls` asks) as `name` with `metadata`; returns the call that stops it."""
        return await self._conn.announce(name, metadata)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking messages, let handlers in flight finish, then close. Idempotent."""
        await self._conn.close(timeout_s)
