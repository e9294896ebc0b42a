"""One request is one trace across the services: spans linked through NATS headers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.launcher.stack import SERVICES
from shared.runtime import observability
from shared.storage.local import LocalStore
from tests.harness import backend, stack_settings


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    observability.configure_tracing("test", SimpleSpanProcessor(exporter))
    yield exporter
    observability.shutdown_tracing()
    observability._provider = None


async def test_one_request_is_one_trace(
    nats_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    settings = stack_settings(nats_url, tmp_path)
    tokens = [256, *range(255)] * 2
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        await be.generate(tokens, kv_mode="compute")  # store the prefix
        spans.clear()
        with observability.tracer("test").start_as_current_span("client.request") as root:
            await be.generate(tokens, kv_mode="cake")
    trace_id = root.get_span_context().trace_id
    finished = spans.get_finished_spans()
    mine = [s for s in finished if s.context.trace_id == trace_id]
    names = {s.name for s in mine}
    assert {"merger.request", "merger.lookup", "loader.lookup", "compute.suffix"} <= names
    assert "compute.first_token" in names and "compute.merge" in names
    assert "loader.chunk" in names or "compute.chunk" in names
    by_id = {s.context.span_id: s for s in mine}
    merger = next(s for s in mine if s.name == "merger.request")
    assert merger.parent is not None and merger.parent.span_id == root.get_span_context().span_id
    lookup = next(s for s in mine if s.name == "loader.lookup")
    assert lookup.parent is not None
    assert by_id[lookup.parent.span_id].name == "merger.lookup"  # linked across NATS
    # each scheduler step is a span of its own, linked to the requests it served
    steps = [s for s in finished if s.name == "scheduler.step"]
    assert any(link.context.trace_id == trace_id for s in steps for link in s.links)
    assert all(s.parent is None for s in steps)
    # no span of this request escaped into another trace
    strays = [s for s in finished if s.name.startswith(("compute.", "loader.")) and s not in mine]
    assert not strays, [s.name for s in strays]


async def test_the_trace_starts_at_the_gateway(
    nats_url: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    settings = stack_settings(nats_url, tmp_path)
    body = {"prompt": "x" * 300, "max_tokens": 2}
    async with (
        LocalStore(settings.store) as store,
        backend(settings, store, SERVICES) as be,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(2):  # the second request hits, so the loader works too
            spans.clear()
            async with http.post(f"{be.url}/v1/completions", json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["cake"]["chunks_total"] == 5
    finished = spans.get_finished_spans()
    gateway = next(s for s in finished if s.name == "gateway.request")
    mine = [s for s in finished if s.context.trace_id == gateway.context.trace_id]
    by_id = {s.context.span_id: s for s in mine}
    assert {"merger.request", "loader.lookup", "compute.first_token"} <= {s.name for s in mine}
    merger = next(s for s in mine if s.name == "merger.request")
    assert merger.parent is not None and by_id[merger.parent.span_id] is gateway
    assert gateway.parent is None  # the request is the root
    compute = [s for s in finished if s.name.startswith(("compute.", "loader."))]
    assert compute and all(s.context.trace_id == gateway.context.trace_id for s in compute)
