"""Logging (structlog) and tracing (OpenTelemetry) for every service.

Logs are JSON lines in services (a console renderer on a terminal) and carry the request id and
trace id of the request being served. Traces go to OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is
set, nowhere otherwise; trace context crosses NATS in W3C ``traceparent`` headers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_provider: TracerProvider | None = None


def _add_trace_id(_: object, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
    return event


def configure_logging(service: str, fmt: str = "auto", level: str = "info") -> None:
    """structlog for this process: JSON or console lines with service, request and trace ids."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            _add_trace_id,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


def configure_tracing(service: str, processor: SpanProcessor | None = None) -> TracerProvider:
    """A tracer provider for this process; OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set.

    `processor` adds a span processor (tests pass one over an in-memory exporter).
    """
    global _provider
    provider = TracerProvider(resource=Resource.create({"service.name": f"cake-{service}"}))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if processor is not None:
        provider.add_span_processor(processor)
    _provider = provider
    return provider


def tracer(name: str) -> trace.Tracer:
    """A tracer from this process's provider (a no-op one before configure_tracing)."""
    if _provider is None:
        return trace.get_tracer(name)
    return _provider.get_tracer(name)


def shutdown_tracing() -> None:
    """Flush and stop the exporter."""
    if _provider is not None:
        _provider.shutdown()
