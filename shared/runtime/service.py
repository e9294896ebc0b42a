"""The life of every service, in one fixed order.

start: connect the bus, build the service (its resources join the same exit stack), subscribe;
`serve()` also exports the service's metric families on CAKE_METRICS_PORT while it runs.
close: stop taking work (handler subscriptions drain), drain work in flight (bounded), cancel
what is left and await it, release resources (store, executors), close the bus, flush traces.
close is idempotent and safe after a failed start. `cake serve`, `cake up` (through
`cake serve`), the in-process stack and the test harness all run services through `running()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, ClassVar, TypeVar

import structlog
from prometheus_client import CollectorRegistry

from shared.core.errors import TransportError
from shared.runtime.config import Settings
from shared.runtime.metrics import new_registry, serve_metrics
from shared.runtime.observability import configure_logging, configure_tracing, shutdown_tracing
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import Message

log = structlog.get_logger(__name__)

T = TypeVar("T")
S = TypeVar("S", bound="Service")
DRAIN_TIMEOUT_S = 10.0


class TaskSet:
    """Background tasks owned by one service: kept alive until they end, awaited on close."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Start a task owned by this set."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout_s: float) -> None:
        """Until every task ended, or timeout_s passed."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def cancel(self) -> None:
        """Cancel every task and wait until each has ended."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Service:
    """Base of the services: subclasses subscribe in start() and finish work in drain()."""

    name: ClassVar[str] = "service"

    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus, self.settings = bus, settings
        self.tasks = TaskSet()  # work in flight: drained on close
        self.loops = TaskSet()  # periodic background work: cancelled when work stops
        self._closed = False

    async def start(self) -> None:
        """Subscribe to the subjects the service handles and start its background work."""

    async def publish_telemetry(self, snapshot: Callable[[], Message]) -> None:
        """Every CAKE_TELEMETRY_S, the service's telemetry window on its node's subject (a send
        that fails loses one window, not the loop)."""
        while True:
            await asyncio.sleep(self.settings.telemetry_s)
            await self.send_telemetry(snapshot())

    async def send_telemetry(self, window: Message) -> None:
        """One telemetry window on the node's subject (a send that fails loses it alone)."""
        try:
            await self.bus.publish(subjects.telemetry(self.name, self.settings.node), window)
        except TransportError as exc:
            log.warning("telemetry not sent", error=str(exc))

    async def stop_taking_work(self) -> None:
        """No new work from now on: the handlers' subscriptions and periodic loops end."""
        await self.bus.stop_handling()
        await self.loops.cancel()

    async def drain(self) -> None:
        """Finish the work in flight (close() bounds it by DRAIN_TIMEOUT_S)."""
        await self.tasks.wait(DRAIN_TIMEOUT_S)

    async def close(self) -> None:
        """Stop taking work, drain (bounded), cancel and await what is left. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.stop_taking_work()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain(), DRAIN_TIMEOUT_S)
        await self.tasks.cancel()

    def describe(self) -> dict[str, Any]:
        """What the ready log line says about this service."""
        return {}

    def registry(self) -> CollectorRegistry | None:
        """The metric families `serve()` exports on CAKE_METRICS_PORT (None: none there)."""
        return None


Builder = Callable[[Bus, Settings, AsyncExitStack], Awaitable[Service]]


@asynccontextmanager
async def running(
    build: Builder, settings: Settings, connect: Callable[[], Awaitable[Bus]]
) -> AsyncIterator[Service]:
    """A started service; on exit it is closed, then its bus, then its resources."""
    async with AsyncExitStack() as stack:
        bus = await connect()
        stack.push_async_callback(bus.close)
        service = await build(bus, settings, stack)
        stack.push_async_callback(service.close)
        await service.start()
        stop_announcing = await bus.announce(f"cake-{service.name}", {"node": settings.node})
        stack.push_async_callback(stop_announcing)
        await bus.flush()  # its subscriptions are live at the server before it counts as up
        yield service


async def serve(name: str, build: Builder, settings: Settings, stop: asyncio.Event) -> None:
    """Run one service until stop is set (what `cake serve NAME` does)."""
    configure_logging(name, settings.log_format, settings.log_level)
    configure_tracing(name)
    try:

        def connect() -> Awaitable[Bus]:
            return Bus.connect(settings.nats_url, f"cake-{name}", tls=settings.nats_tls())

        async with running(build, settings, connect) as service:
            registry = service.registry()
            port = settings.metrics_port if registry is not None else 0
            async with serve_metrics(registry or new_registry(), settings.host, port):
                log.info(f"{name} ready", **service.describe())
                await stop.wait()
                log.info(f"{name} stopping")
    finally:
        shutdown_tracing()
