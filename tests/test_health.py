"""/health over the real services: 200 only when a request would be served."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest

from services.compute.service import Compute
from services.gateway import app as gateway_app
from services.launcher.stack import SERVICES
from shared.core.errors import StoreError
from shared.storage.local import LocalStore
from shared.wire import subjects
from shared.wire.messages import LoaderTelemetry, Message
from tests.harness import backend, eventually, stack_settings


async def test_health_is_503_with_the_reason_until_every_service_answers(
    nats_url: str, tmp_path: Path
) -> None:
    settings = stack_settings(nats_url, tmp_path)
    async with (
        LocalStore(settings.store) as store,
        backend(settings, store, ("gateway", "merger", "loader")) as be,
        aiohttp.ClientSession() as session,
        session.get(f"{be.url}/health") as resp,
    ):
        body = await resp.json()
    assert resp.status == 503 and "compute" in body["reason"], body
    assert "loader" not in body["reason"] and "merger" not in body["reason"], body


async def test_a_stream_whose_compute_dies_ends_with_an_error_event(
    nats_url: str, tmp_path: Path
) -> None:
    """Compute says Alive for each request every CAKE_HEARTBEAT_S; when it goes silent (here: its
    NATS connection drops mid-stream) the client gets an error event and [DONE] within three
    heartbeats, not at the deadline (30 s here)."""
    settings = stack_settings(nats_url, tmp_path, heartbeat_s=0.2)
    body = {"prompt": "x" * 300, "max_tokens": 3000, "stream": True, "temperature": 0}
    async with (
        LocalStore(settings.store) as store,
        backend(settings, store, SERVICES) as be,
        aiohttp.ClientSession() as session,
        session.post(f"{be.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        events: list[bytes] = []
        killed_at = 0.0
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line.strip())
            if len(events) == 2 and not killed_at:
                compute = be.services["compute"]
                assert isinstance(compute, Compute)
                await compute.bus.close()  # gone: no Done, no Failed, no Alive
                killed_at = time.monotonic()
        ended_after = time.monotonic() - killed_at
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][len(b"data: ") :])["error"]
    assert error["code"] == "unavailable" and "stopped answering" in error["message"]
    assert ended_after < 3.0


class ReadOnlyStore(LocalStore):
    """A store that stopped taking writes (a full disk, a revoked PutObject)."""

    async def put(self, key: str, data: bytes) -> None:
        raise StoreError("PutObject: AccessDenied")


async def test_health_reports_a_store_that_refuses_writes(nats_url: str, tmp_path: Path) -> None:
    """Requests are still served (they compute what they cannot load), so /health stays 200, and
    says that nothing new is being cached."""
    settings = stack_settings(nats_url, tmp_path)
    async with (
        ReadOnlyStore(settings.store) as store,
        backend(settings, store, SERVICES) as be,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{be.url}/health") as resp:
            assert (resp.status, await resp.json()) == (200, {"status": "ok"})
        body = {"prompt": "y" * 300, "max_tokens": 2}
        async with session.post(f"{be.url}/v1/completions", json=body) as resp:
            assert resp.status == 200  # answered; its write-back failed
        await asyncio.sleep(1.1)  # /health reuses a finding for a second
        async with session.get(f"{be.url}/health") as resp:
            health = await resp.json()
    assert resp.status == 200 and health["status"] == "ok", health
    assert "refuses writes" in health["degraded"] and "AccessDenied" in health["degraded"]


async def test_health_reports_each_nodes_store_problem_whichever_loader_answers(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes' loaders take turns answering /health's probe; the one whose store refuses
    writes shows in every answer (from its telemetry), not only in those it gave itself."""
    monkeypatch.setattr(gateway_app, "HEALTH_CACHE_S", 0.0)  # every GET probes afresh
    settings = stack_settings(nats_url, tmp_path, telemetry_s=0.2)
    healthy = settings.replace(node="healthy-node")
    async with (
        ReadOnlyStore(settings.store) as store,
        LocalStore(settings.store) as healthy_store,
        backend(settings, store, SERVICES) as be,
        backend(healthy, healthy_store, ("loader",)),
        aiohttp.ClientSession() as session,
    ):
        told: list[LoaderTelemetry] = []  # the failing node's windows that name its problem

        async def hear(msg: Message, _: str) -> None:
            if isinstance(msg, LoaderTelemetry) and msg.node == settings.node and msg.store_problem:
                told.append(msg)

        await be.client.handle(subjects.TELEMETRY_ALL, hear)
        body = {"prompt": "z" * 300, "max_tokens": 2}
        async with session.post(f"{be.url}/v1/completions", json=body) as resp:
            assert resp.status == 200  # its write-back, on this node, failed
        # two windows heard here: the gateway, which hears the same subject, has the first
        await eventually(lambda: len(told) >= 2, "two telemetry windows naming the problem")
        answers = []
        for _ in range(10):
            async with session.get(f"{be.url}/health") as resp:
                answers.append((resp.status, await resp.json()))
    for status, health in answers:
        assert status == 200 and health["status"] == "ok", health
        assert f"loader on {settings.node}: the store refuses writes" in health["degraded"]
        assert "healthy-node" not in health["degraded"], health
