"""The bus's connection over NATS (nats-py): the only module that touches the NATS client."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

import nats
import nats.errors
import nats.micro as micro
import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from shared.core.errors import ConnectionLost, NoResponders, PayloadTooLarge, RequestTimeout
from shared.wire import subjects
from shared.wire.bus import RawMsg


def cake_version() -> str:
    """The installed package's version (0.0.0 when run from a source tree without it)."""
    try:
        return importlib.metadata.version("cake")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


log = structlog.get_logger(__name__)
CONNECT_ATTEMPT_S = 3.0  # the least one connection attempt gets (nats-py's connect_timeout: 2 s)


class NatsInbox:
    """A NATS subscription read one message at a time."""

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    @property
    def subject(self) -> str:
        """What it subscribes to."""
        return str(self._sub.subject)

    async def next_msg(self, timeout: float) -> RawMsg:
        """The next message; RequestTimeout when none came, ConnectionLost when closed."""
        try:
            return await self._sub.next_msg(timeout=timeout)
        except nats.errors.TimeoutError:
            raise RequestTimeout(f"nothing arrived within {timeout:g}s") from None
        except nats.errors.ConnectionClosedError:
            raise ConnectionLost("the NATS connection is closed") from None

    async def drain(self) -> None:
        """Take no more messages; let the callback finish the ones already received.

        nats-py's drain (2.16) sends UNSUB and one flush, whose PING can overtake the UNSUB (see
        flushed()); a message the server routes here in between arrives once the subscription
        is gone and is dropped, not sent to another member of its queue group. So the UNSUB
        goes first and is known to be in force before nats-py's drain, whose own UNSUB the
        server then ignores."""
        try:
            nc = self._sub._conn
            await nc._send_unsubscribe(self._sub._id)
            await flushed(nc)
            await self._sub.drain()
        except nats.errors.Error as exc:
            raise ConnectionLost(f"cannot drain a NATS subscription: {exc!r}") from exc

    async def unsubscribe(self) -> None:
        """Stop receiving (nothing to do once the connection is closed)."""
        with contextlib.suppress(
            nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError
        ):
            await self._sub.unsubscribe()


class NatsConnection:
    """One NATS client connection."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc

    @classmethod
    async def open(
        cls, url: str, name: str, timeout_s: float, tls: ssl.SSLContext | None = None
    ) -> NatsConnection:
        """Connect to one of the servers in `url` (comma-separated; retrying until
        timeout_s); reconnect forever once connected, to any member of the cluster: those
        given and those the server names (the credentials in the first URL go to every one).
        With `tls`, over TLS, the servers' certificates checked against it.
        """

        async def on_error(exc: Exception) -> None:
            log.warning("nats connection error", client=name, error=repr(exc))

        async def on_disconnect() -> None:
            log.debug("nats disconnected", client=name)

        first = urlparse(url.split(",")[0])
        deadline = time.monotonic() + timeout_s
        while True:
            nc = Client()
            try:  # (a server that refuses the handshake can keep nats-py trying: bounded here)
                await asyncio.wait_for(
                    nc.connect(
                        url.split(","), name=name, user=first.username,
                        password=first.password, tls=tls,
                        inbox_prefix=subjects.inbox_prefix(first.username),
                        connect_timeout=2, allow_reconnect=True,
                        max_reconnect_attempts=-1, reconnect_time_wait=0.5,  # type: ignore[arg-type]
                        error_cb=on_error, disconnected_cb=on_disconnect,
                    ),
                    max(CONNECT_ATTEMPT_S, deadline - time.monotonic()),
                )  # fmt: skip
                return cls(nc)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                if time.monotonic() >= deadline:
                    where = redacted(url)
                    raise ConnectionLost(f"cannot reach NATS at {where}: {exc!r}") from exc
                await asyncio.sleep(0.5)

    @property
    def connected(self) -> bool:
        """Whether the client is connected now."""
        return bool(self._nc.is_connected)

    @property
    def max_payload(self) -> int:
        """The server's message size limit."""
        return int(self._nc.max_payload)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str], reply: str = ""
    ) -> None:
        """Send one message."""
        try:
            await self._nc.publish(subject, data, reply=reply, headers=headers or None)
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"a message of {len(data)} bytes on {subject}: {exc}") from exc
        except nats.errors.Error as exc:  # closed, draining, buffer full while reconnecting...
            raise ConnectionLost(f"cannot publish on {subject}: {exc!r}") from exc

    async def request(
        self, subject: str, data: bytes, headers: dict[str, str], timeout_s: float
    ) -> RawMsg:
        """Send and wait for one reply."""
        try:
            return await self._nc.request(subject, data, timeout=timeout_s, headers=headers)
        except nats.errors.NoRespondersError:
            raise NoResponders(f"nobody listens on {subject}") from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(f"no answer on {subject} within {timeout_s:g}s") from None
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(f"a message of {len(data)} bytes on {subject}: {exc}") from exc
        except nats.errors.Error as exc:
            raise ConnectionLost(f"cannot send a request on {subject}: {exc!r}") from exc

    async def subscribe(
        self, subject: str, queue: str, callback: Callable[[RawMsg], Awaitable[None]]
    ) -> NatsInbox:
        """Deliver each message to callback (nats-py runs one subscription's callbacks in order)."""
        return NatsInbox(await self._nc.subscribe(subject, queue=queue, cb=callback))

    async def inbox(self, subject: str) -> NatsInbox:
        """A subscription to read with next_msg."""
        return NatsInbox(await self._nc.subscribe(subject))

    async def flush(self) -> None:
        """Until the server has processed everything sent so far."""
        await flushed(self._nc)

    async def announce(self, name: str, metadata: dict[str, str]) -> Callable[[], Awaitable[None]]:
        """A nats.micro service of this name (no endpoints: Cake's subjects are its own), for
        discovery."""
        service = await micro.add_service(
            self._nc, name=name, version=cake_version(), metadata=metadata,
            description="Cake: compute the head of a prompt's KV while loading its tail",
        )  # fmt: skip
        await flushed(self._nc)  # answering before this returns

        async def stop() -> None:
            if self._nc.is_closed:  # its subscriptions went with the connection
                return
            with contextlib.suppress(nats.errors.Error):
                await service.stop()
                await flushed(self._nc)

        return stop

    async def close(self, timeout_s: float) -> None:
        """Drain (handlers in flight finish), then close. Idempotent."""
        if self._nc.is_closed:
            return
        try:
            await asyncio.wait_for(self._nc.drain(), timeout_s)
        except (TimeoutError, nats.errors.Error):
            await self._nc.close()


async def flushed(nc: Client) -> None:
    """Until the server has processed everything sent so far on nc.

    nats-py (2.16) writes a flush's PING straight to the socket, ahead of commands still
    queued for its flusher task, so one PONG can come back before a SUB just made is in force
    (1 to 3 in 100 on localhost, in bursts). Two round trips: the first gets the queue written, the
    second PING follows it on the wire.
    """
    await nc.flush()
    await nc.flush()


def redacted(url: str) -> str:
    """The URLs (comma-separated) without credentials (user:password@), for messages and logs."""
    bare = []
    for one in url.split(","):
        scheme, sep, rest = one.partition("://")
        bare.append(scheme + sep + rest.rpartition("@")[2])
    return ",".join(bare)
