"""The gateway service: the OpenAI-compatible HTTP front door of Cake.

Stopping takes the service's usual order: stop accepting connections (the API and /metrics),
let requests in flight finish (at most DRAIN_TIMEOUT_S), and only then close the bus, since
those requests still read their streams from it.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import structlog
from aiohttp import web

from services.gateway.app import make_app
from services.gateway.metrics import GatewayMetrics
from shared.kv.tokenizer import load_tokenizer
from shared.runtime.config import Settings
from shared.runtime.service import DRAIN_TIMEOUT_S, Service
from shared.wire.bus import Bus

log = structlog.get_logger(__name__)


class Gateway(Service):
    """The HTTP server and the bus it serves requests over."""

    name = "gateway"

    def __init__(
        self, bus: Bus, settings: Settings, app: web.Application, metrics: GatewayMetrics
    ) -> None:
        super().__init__(bus, settings)
        self.runner = web.AppRunner(
            app, shutdown_timeout=DRAIN_TIMEOUT_S, handler_cancellation=True, access_log=None
        )
        self.metrics = metrics

    async def start(self) -> None:
        """Listen for HTTP (the API and the request-level /metrics)."""
        await self.runner.setup()
        await web.TCPSite(self.runner, self.settings.host, self.settings.port).start()

    @property
    def url(self) -> str:
        """The base URL the server listens on (the OS's port when the setting is 0)."""
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def stop_taking_work(self) -> None:
        """Stop listening, let requests in flight finish (bounded), stop the handlers."""
        await self.runner.cleanup()
        await super().stop_taking_work()

    def describe(self) -> dict[str, Any]:
        """Where it listens, for the ready log line."""
        return {"url": self.url, "model": self.settings.model} if self.runner.addresses else {}


async def build(bus: Bus, settings: Settings, _: AsyncExitStack) -> Gateway:
    """The gateway for the model the settings name (its tokenizer; no weights are loaded)."""
    tokenizer = load_tokenizer(settings.model, settings.model_revision)
    metrics = GatewayMetrics()
    app = make_app(bus, settings, tokenizer, settings.model, metrics)
    return Gateway(bus, settings, app, metrics)
