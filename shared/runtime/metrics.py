"""Prometheus metrics with prometheus_client: rendering, and a small HTTP server per service.

Each service object keeps its own `CollectorRegistry` (never the global default one), so
several services can run in one process (the tests do). The gateway serves its registry on its
own HTTP port at /metrics; merger, compute and loader serve theirs with `serve_metrics` on
CAKE_METRICS_PORT.

Counters are named without `_total` (prometheus_client appends it), and the `_created` series
prometheus_client would add to every counter and histogram are turned off: the exposition has
the same series as before the library was used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from shared.core.errors import ConfigError

log = structlog.get_logger(__name__)

disable_created_metrics()  # no <name>_created series (process-wide; Cake never uses them)


def new_registry() -> CollectorRegistry:
    """A registry of one service's families (not prometheus_client's global REGISTRY)."""
    return CollectorRegistry(auto_describe=True)


def render(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The registry's samples and their content type, negotiated from an Accept header like
    prometheus_client's own server does: the Prometheus text format (version 0.0.4) unless the
    scraper asks for OpenMetrics or text version 1.0.0."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler answering GET /metrics from registry."""

    async def handler(request: web.Request) -> web.Response:
        body, content_type = render(registry, request.headers.get("Accept"))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handler


@asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int
) -> AsyncIterator[str | None]:
    """Serve registry at http://host:port/metrics while the block runs; yields that URL.

    Port 0 serves nothing (yields None). A port that cannot be bound raises ConfigError. The
    server is closed (port released) when the block exits, however it exits.
    """
    if not port:
        yield None
        return
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port} (CAKE_METRICS_PORT): {exc}"
            ) from exc
        url = f"http://{host}:{port}/metrics"
        log.info("serving metrics", url=url)
        yield url
    finally:
        await runner.cleanup()
