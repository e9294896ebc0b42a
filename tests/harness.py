"""In-process Cake services on a real nats-server, for pipeline and end-to-end tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from aiohttp import web

from services.compute.service import Compute
from services.gateway.app import make_app
from services.gateway.metrics import GatewayMetrics
from services.launcher.stack import SERVICES
from services.loader.service import Loader
from services.merger.service import Merger
from shared.core.keys import pack_tokens, unpack_tokens
from shared.core.request import KvMode, Sampling
from shared.kv.model import ModelRunner
from shared.kv.tokenizer import ByteTokenizer
from shared.runtime.config import Settings
from shared.storage.base import ChunkStore
from shared.storage.s3 import S3Store
from shared.storage.staging import Staging
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import Accepted, Done, Failed, GenerateRequest, Message, Tokens


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
        "node": "node-" + uuid.uuid4().hex[:8],
    }
    base.update(changes)
    return Settings(**base).validated()  # type: ignore[arg-type]


@dataclass
class Result:
    """What came back on a request's stream."""

    tokens: list[int]
    end: Done | Failed
    elapsed_s: float

    @property
    def done(self) -> Done:
        """The Done message (fails the test when the request failed)."""
        assert isinstance(self.end, Done), self.end
        return self.end


@dataclass
class Backend:
    """Merger, compute and loader (any of them may be left out) plus a client bus."""

    settings: Settings
    store: ChunkStore
    client: Bus
    services: dict[str, object] = field(default_factory=dict)
    url: str = ""  # the gateway's base URL, when it runs

    async def generate(
        self, tokens: Sequence[int], kv_mode: str = KvMode.CAKE, salt: str = "", max_tokens: int = 8
    ) -> Result:
        """Send one request as the gateway would and collect its stream."""
        rid = "t-" + uuid.uuid4().hex
        sub = await self.client.nc.subscribe(subjects.stream(rid))
        start = time.monotonic()
        deadline = time.time() + self.settings.request_timeout_s
        sampling = Sampling(max_tokens=max_tokens)
        req = GenerateRequest(rid, pack_tokens(tokens), sampling, KvMode(kv_mode), salt, deadline)
        await self.client.request(subjects.GENERATE, req, Accepted, self.settings.rpc_timeout_s)
        out: list[int] = []
        try:
            while True:
                raw = await sub.next_msg(timeout=self.settings.request_timeout_s + 5)
                msg = Message.decode(raw.data)
                if isinstance(msg, Tokens):
                    out += unpack_tokens(msg.tokens)
                elif isinstance(msg, Done | Failed):
                    return Result(out, msg, time.monotonic() - start)
        finally:
            await sub.unsubscribe()


@asynccontextmanager
async def backend(
    settings: Settings,
    store: ChunkStore,
    services: Sequence[str] = ("merger", "compute", "loader"),
) -> AsyncIterator[Backend]:
    """Start the chosen services in this process, each on its own NATS connection."""
    async with AsyncExitStack() as stack:
        client = await Bus.connect(settings.nats_url, "test-client")
        stack.push_async_callback(client.close)
        be = Backend(settings, store, client)
        staging = Staging(settings.staging_dir)
        for name in services:
            bus = await Bus.connect(settings.nats_url, f"test-{name}")
            stack.push_async_callback(bus.close)
            if name == "gateway":
                be.url = await start_gateway(stack, bus, settings)
                continue
            service: Compute | Loader | Merger
            if name == "compute":
                service = Compute(bus, default_runner(), staging, settings)
            elif name == "loader":
                service = Loader(bus, store, staging, settings)
            else:
                service = Merger(bus, settings)
            await service.start()
            stack.push_async_callback(service.close)
            be.services[name] = service
        await client.nc.flush()
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


async def start_gateway(stack: AsyncExitStack, bus: Bus, settings: Settings) -> str:
    """The real gateway app on a free local port; its base URL."""
    app = make_app(bus, settings, ByteTokenizer(), "default", GatewayMetrics(), 32768)
    runner = web.AppRunner(app)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, "127.0.0.1", 0).start()  # the OS picks a free port
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"
