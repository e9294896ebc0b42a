"""NATS plumbing shared by the services: typed publish, request/reply and handlers.

Every message is a shared.wire.messages.Message; trace context rides in the W3C traceparent header;
a handler's failure crosses the wire as an error code and description in reply headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import context as otel_context
from opentelemetry import propagate

from shared.core.errors import CakeError
from shared.wire.messages import Message

log = structlog.get_logger(__name__)

ERROR_HEADER = "Cake-Error"
ERROR_CODE_HEADER = "Cake-Error-Code"

R = TypeVar("R", bound=Message)
Handler = Callable[[Message, Msg], Awaitable[Message | None]]


def inject_headers() -> dict[str, str]:
    """Headers carrying the current trace context (W3C traceparent)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def extract_context(headers: dict[str, str] | None) -> otel_context.Context:
    """The trace context carried in message headers (empty when there is none)."""
    return propagate.extract(dict(headers or {}))


class RemoteError(CakeError):
    """The service that handled a request answered with an error."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


class Unavailable(CakeError):
    """Nobody answered a request in time (no responders, or a timeout)."""

    code = "unavailable"


class Bus:
    """One NATS connection with Cake's message conventions."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._subs: list[Subscription] = []

    @classmethod
    async def connect(cls, url: str, name: str, timeout_s: float = 10.0) -> Bus:
        """Connect (retrying until timeout_s); reconnects forever once connected."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats connection error", client=name, error=repr(exc))

        async def on_disconnect() -> None:
            log.debug("nats disconnected", client=name)

        nc = await nats.connect(
            url, name=name, connect_timeout=2, allow_reconnect=True,
            max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            error_cb=on_error, disconnected_cb=on_disconnect,
        )  # fmt: skip
        return cls(nc)

    async def publish(self, subject: str, message: Message) -> None:
        """Fire and forget, with the current trace context."""
        await self.nc.publish(subject, message.encode(), headers=inject_headers())

    async def request(
        self, subject: str, message: Message, reply_type: type[R], timeout_s: float
    ) -> R:
        """Send and wait for one typed reply; RemoteError or Unavailable otherwise."""
        try:
            reply = await self.nc.request(
                subject, message.encode(), timeout=timeout_s, headers=inject_headers()
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise Unavailable(f"no answer on {subject} within {timeout_s:g}s") from exc
        headers = reply.headers or {}
        if ERROR_CODE_HEADER in headers:
            raise RemoteError(headers[ERROR_CODE_HEADER], headers.get(ERROR_HEADER, ""))
        return reply_type.decode(reply.data)

    async def handle(self, subject: str, handler: Handler, queue: str = "") -> Subscription:
        """Run handler for each message (in the sender's trace context) and answer requests."""

        async def on_message(msg: Msg) -> None:
            token = otel_context.attach(extract_context(msg.headers))
            try:
                reply = await handler(Message.decode(msg.data), msg)
                if msg.reply and reply is not None:
                    await self.nc.publish(msg.reply, reply.encode())
            except Exception as exc:
                code = exc.code if isinstance(exc, CakeError) else "internal"
                log.exception("handler failed", subject=msg.subject, code=code)
                if msg.reply:
                    headers = {ERROR_CODE_HEADER: code, ERROR_HEADER: str(exc)[:1000]}
                    await self.nc.publish(msg.reply, b"", headers=headers)
            finally:
                otel_context.detach(token)

        sub = await self.nc.subscribe(subject, queue=queue, cb=on_message)
        self._subs.append(sub)
        return sub

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking messages, let handlers in flight finish, then close. Idempotent."""
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout_s)
        except (TimeoutError, nats.errors.Error):
            await self.nc.close()


def spawn(coro: Awaitable[Any], tasks: set[asyncio.Task[Any]]) -> asyncio.Task[Any]:
    """Start a background task kept alive in `tasks` until it ends."""
    task = asyncio.ensure_future(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
