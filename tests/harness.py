"""In-process Cake services on a real nats-server, for pipeline and end-to-end tests."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from services.gateway.app import make_app
from services.gateway.metrics import GatewayMetrics
from services.gateway.service import Gateway
from services.launcher.in_process import Result, generate
from services.launcher.in_process import builders as in_process_builders
from services.launcher.stack import SERVICES
from shared.kv.model import ModelRunner
from shared.kv.tokenizer import ByteTokenizer
from shared.runtime.config import Settings
from shared.runtime.service import Builder, Service, running
from shared.storage.base import ChunkStore
from shared.storage.s3 import S3Store
from shared.wire.bus import Bus


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 5.0
) -> None:
    """Wait until condition() holds (polled every 50 ms), or fail saying what did not happen:
    telemetry windows and background copies land when they land, not after a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


@cache
def default_runner() -> ModelRunner:
    """The embedded default model, loaded once per test session."""
    return ModelRunner.load()


def stack_settings(nats_url: str, tmp: Path, **changes: object) -> Settings:
    """Small chunks and short deadlines so the tests run fast and fail fast."""
    base = {
        "nats_url": nats_url,
        "store": str(tmp / "store"),
        "staging_dir": str(tmp / "staging"),
        "chunk_tokens": 64,
        "token_budget": 128,
        "request_timeout_s": 30.0,
        "rpc_timeout_s": 2.0,
        "fetch_timeout_s": 5.0,
        "memory_tier": False,  # these tests follow the storage path; tests of the tier turn it on
        "split_cost_chunks": 1.0,  # their 10-20 chunk hits split unless one saves under a chunk
        "node": "node-" + uuid.uuid4().hex[:8],
    }
    base.update(changes)
    return Settings(**base).validated()  # type: ignore[arg-type]


@dataclass
class Backend:
    """Merger, compute and loader (any of them may be left out) plus a client bus."""

    settings: Settings
    store: ChunkStore
    client: Bus
    services: dict[str, object] = field(default_factory=dict)
    url: str = ""  # the gateway's base URL, when it runs

    async def generate(
        self, tokens: Sequence[int], kv_mode: str = "cake", salt: str = "", max_tokens: int = 8
    ) -> Result:
        """Send one request as the gateway would and collect its stream."""
        return await generate(self.client, self.settings, tokens, kv_mode, salt, max_tokens)


def builders(store: ChunkStore) -> dict[str, Builder]:
    """The in-process builders (the cached model, the test's store) plus a gateway with the
    byte tokenizer on a free port."""

    async def gateway(bus: Bus, settings: Settings, _: AsyncExitStack) -> Service:
        metrics = GatewayMetrics()
        app = make_app(bus, settings, ByteTokenizer(), "default", metrics, 32768)
        return Gateway(bus, settings.replace(port=0), app, metrics)

    return {**in_process_builders(default_runner(), store), "gateway": gateway}


@asynccontextmanager
async def backend(
    settings: Settings,
    store: ChunkStore,
    services: Sequence[str] = ("merger", "compute", "loader"),
) -> AsyncIterator[Backend]:
    """Start the chosen services in this process, each on its own NATS connection, the way
    `cake serve` runs them (shared.runtime.service.running)."""
    build = builders(store)
    async with AsyncExitStack() as stack:
        client = await Bus.connect(settings.nats_url, "test-client")
        stack.push_async_callback(client.close)
        be = Backend(settings, store, client)
        for name in services:

            def connect(name: str = name) -> Awaitable[Bus]:
                return Bus.connect(settings.nats_url, f"test-{name}")

            service = await stack.enter_async_context(running(build[name], settings, connect))
            be.services[name] = service
            if isinstance(service, Gateway):
                be.url = service.url
        await client.flush()
        yield be
        await asyncio.sleep(0)


@asynccontextmanager
async def s3_backend(
    nats_url: str, tmp: Path, s3_endpoint: str, services: Sequence[str] = SERVICES[1:]
) -> AsyncIterator[Backend]:
    """backend() over a fresh bucket of the moto S3 server."""
    bucket = "cake-" + uuid.uuid4().hex[:12]
    settings = stack_settings(nats_url, tmp, store=f"s3://{bucket}/kv")
    store = S3Store(bucket, "kv/", endpoint_url=s3_endpoint)
    async with store:
        await store.ensure_bucket()
        async with backend(settings, store, services) as be:
            yield be
