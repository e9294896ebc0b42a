"""Cake in one process: the very merger, compute and loader services over an in-process bus.

The benchmark's pipeline-overhead baseline runs the same request through these and through the
deployed stack, so the ratio measures NATS and the process boundaries and nothing else. The
test harness builds its services with the same builders, over a real nats-server.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from services.compute.service import Compute
from services.loader.service import Loader
from services.merger.service import build as build_merger
from shared.core.keys import pack_tokens, unpack_tokens
from shared.core.request import KvMode, Sampling
from shared.kv.model import ModelRunner
from shared.runtime.config import Settings
from shared.runtime.service import Builder, Service, running
from shared.storage.base import ChunkStore
from shared.storage.staging import Staging
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.local import LocalBroker, LocalConnection
from shared.wire.messages import Accepted, Done, Failed, GenerateRequest, Tokens

BACKEND = ("merger", "compute", "loader")


@dataclass
class Result:
    """What came back on a request's stream."""

    tokens: list[int]
    end: Done | Failed
    elapsed_s: float  # from sending the request to its end
    first_token_s: float | None  # from sending the request to its first token
    marked_last: list[bool] = field(default_factory=list)  # each Tokens message's `last`

    @property
    def done(self) -> Done:
        """The Done message (AssertionError when the request failed)."""
        assert isinstance(self.end, Done), self.end
        return self.end


async def generate(
    client: Bus,
    settings: Settings,
    tokens: Sequence[int],
    kv_mode: str = "cake",
    salt: str = "",
    max_tokens: int = 8,
) -> Result:
    """Send one request as the gateway does and collect its stream."""
    rid = "t-" + uuid.uuid4().hex
    start = time.monotonic()
    deadline = time.time() + settings.request_timeout_s
    sampling = Sampling(max_tokens=max_tokens)
    req = GenerateRequest(rid, pack_tokens(tokens), sampling, KvMode(kv_mode), salt, deadline)
    out: list[int] = []
    first: float | None = None
    marked: list[bool] = []
    async with await client.subscribe(subjects.stream(rid)) as inbox:
        await client.request(subjects.GENERATE, req, Accepted, settings.rpc_timeout_s)
        while True:
            msg = (await inbox.next(settings.request_timeout_s + 5)).message
            if isinstance(msg, Tokens):
                if first is None:
                    first = time.monotonic() - start
                out += unpack_tokens(msg.tokens)
                marked.append(msg.last)
            elif isinstance(msg, Done | Failed):
                return Result(out, msg, time.monotonic() - start, first, marked)


def builders(runner: ModelRunner, store: ChunkStore) -> dict[str, Builder]:
    """Build compute around an already loaded model and the loader around an open store."""

    async def compute(bus: Bus, settings: Settings, _: AsyncExitStack) -> Service:
        return Compute(bus, runner, Staging(settings.staging_dir), settings)

    async def loader(bus: Bus, settings: Settings, _: AsyncExitStack) -> Service:
        return Loader(bus, store, Staging(settings.staging_dir), settings)

    return {"merger": build_merger, "compute": compute, "loader": loader}


@asynccontextmanager
async def in_process(
    settings: Settings, runner: ModelRunner, store: ChunkStore
) -> AsyncIterator[Bus]:
    """Merger, compute and loader on one in-process bus; yields a client bus to send on."""
    broker = LocalBroker()

    async def connect() -> Bus:
        return Bus(LocalConnection(broker))

    build = builders(runner, store)
    async with AsyncExitStack() as stack:
        for name in BACKEND:
            await stack.enter_async_context(running(build[name], settings, connect))
        client = await connect()
        stack.push_async_callback(client.close)
        yield client
