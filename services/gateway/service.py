"""The gateway service: the OpenAI-compatible HTTP front door of Cake.

Lifecycle: connect to NATS, serve HTTP (the API and /metrics) until `stop`; then stop
accepting connections, let requests in flight finish (at most DRAIN_TIMEOUT_S) and close the
bus last, since those requests still read their streams from it.
"""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web

from services.gateway.app import make_app
from services.gateway.metrics import GatewayMetrics
from shared.kv.model import load_config
from shared.kv.tokenizer import load_tokenizer
from shared.runtime.config import Settings
from shared.runtime.observability import configure_logging, configure_tracing, shutdown_tracing
from shared.wire.bus import Bus

log = structlog.get_logger(__name__)

DRAIN_TIMEOUT_S = 10.0


def model_max_context(settings: Settings) -> int | None:
    """The served model's context length, read from its config (no weights are loaded)."""
    config = load_config(settings.model, settings.model_revision)
    return int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0) or None


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run the gateway until stop is set."""
    configure_logging("gateway", settings.log_format, settings.log_level)
    configure_tracing("gateway")
    tokenizer = load_tokenizer(settings.model, settings.model_revision)
    max_context = model_max_context(settings)
    metrics = GatewayMetrics()
    bus = await Bus.connect(settings.nats_url, "cake-gateway")
    app = make_app(bus, settings, tokenizer, settings.model, metrics, max_context)
    runner = web.AppRunner(
        app, shutdown_timeout=DRAIN_TIMEOUT_S, handler_cancellation=True, access_log=None
    )
    try:
        await runner.setup()
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("gateway listening", host=settings.host, port=settings.port, model=settings.model)
        await stop.wait()
    finally:
        await runner.cleanup()
        await bus.close()
        shutdown_tracing()
