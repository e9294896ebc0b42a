"""The idle link probe: an idle loader keeps reading the link's pace, and the mergers learn it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest

from services.loader.gate import ReadGate
from services.loader.link_probe import LinkProbe
from services.loader.service import Loader
from services.loader.service import build as build_loader
from services.merger.service import Merger
from shared.core.fetch_limit import FetchLimit
from shared.runtime.config import Settings
from shared.runtime.service import running
from shared.storage.local import LocalStore
from shared.storage.staging import Staging
from shared.storage.throttled import ThrottledStore
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import LoaderTelemetry, Message, ModelInfo, Space
from tests.harness import stack_settings


async def test_the_gate_counts_idle_time_from_the_last_read() -> None:
    gate = ReadGate(FetchLimit(2.0, max_limit=2))
    await gate.acquire()
    assert gate.idle_s() == 0.0  # a read in flight
    await asyncio.sleep(0.05)
    await gate.release()
    await asyncio.sleep(0.1)
    assert 0.1 <= gate.idle_s() < 0.5


async def test_a_probe_reads_at_the_link_s_rate_and_is_stored_again_when_evicted(
    tmp_path: Path,
) -> None:
    async with ThrottledStore(LocalStore(tmp_path / "store"), bandwidth_MBps=10) as store:
        staging = Staging(tmp_path / "staging")
        probe = LinkProbe(store, staging, "n")
        await probe.install()
        rate = await probe.read_MBps()
        assert rate is not None and 8.0 < rate <= 10.0  # 1 MiB at 10 MB/s, hashed after
        await store.delete(probe.key)  # evicted
        assert await probe.read_MBps() is None
        assert await store.exists(probe.key)  # and stored again
        assert await probe.read_MBps() is not None
        await probe.remove()
        assert not await store.exists(probe.key)
        assert staging.usage_bytes() == 0  # nothing left staged


async def test_an_idle_loader_follows_its_link_and_removes_its_probe_at_shutdown(
    nats_url: str, tmp_path: Path
) -> None:
    """The link goes from 8 to 80 MB/s two seconds after the loader starts, while nothing is
    read: the probe's readings, each sent at once, follow it."""
    settings = stack_settings(
        nats_url, tmp_path, store_bandwidth_trace="0:8,2:80", store_bandwidth_period_s=100.0,
        link_probe_s=0.2, telemetry_s=30.0,
    )  # fmt: skip
    got: list[tuple[float, float]] = []

    async def collect(message: Message, _: str) -> None:
        if isinstance(message, LoaderTelemetry) and message.probe_MBps > 0:
            got.append((time.monotonic(), message.probe_MBps))

    client = await Bus.connect(nats_url, "test-client")
    try:
        await client.handle(subjects.TELEMETRY_ALL, collect)
        await client.flush()

        def connect() -> Awaitable[Bus]:
            return Bus.connect(nats_url, "test-loader")

        started = time.monotonic()
        async with running(build_loader, settings, connect) as loader:
            assert isinstance(loader, Loader) and loader.link_probe is not None
            key = loader.link_probe.key
            await asyncio.sleep(3.0)
    finally:
        await client.close()
    slow = [rate for at, rate in got if at - started < 1.8]
    fast = [rate for at, rate in got if at - started > 2.3]
    assert slow and all(6.0 < r <= 8.0 for r in slow), got  # never faster than the link
    assert fast and all(40.0 < r <= 80.0 for r in fast), got
    async with LocalStore(settings.store) as store:
        assert not await store.exists(key)  # removed when the loader closed


async def test_every_merger_learns_a_probed_link_in_chunks_once_it_knows_their_size() -> None:
    """A probe reading is one sample of the link's pace a chunk: chunk bytes over the rate."""
    space = Space("f", 2, 2, 16, "float32", 128)  # 32 KiB a chunk
    probed = LoaderTelemetry(
        node="n", window_s=1.0, reads=0, nbytes=0, read_s=0.0, busy_s=0.0, in_flight=0,
        read_limit=4, stalls=0, failures=0, probe_MBps=32.768,
    )  # fmt: skip
    merger = Merger(None, Settings())  # type: ignore[arg-type]
    await merger.on_telemetry(probed, "cake.telemetry.loader.n")
    assert merger.estimator.load_s.value is None  # no chunk size yet: compute has not said
    merger.remember(ModelInfo("default", space, None, "n", chunk_compute_s=0.1))
    await merger.on_telemetry(probed, "cake.telemetry.loader.n")
    for estimator in (merger.estimator, merger.node_estimator("n")):
        assert estimator.load_s.value == pytest.approx(space.chunk_bytes() / 32.768e6)
    assert space.chunk_bytes() == 128 * 2 * 2 * 2 * 16 * 4


class Published:
    """Stands in for the bus: keeps what the loader publishes."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def publish(self, _: str, message: Message) -> None:
        self.sent.append(message)


async def test_a_probe_that_shared_the_link_with_a_chunk_read_is_not_sent(tmp_path: Path) -> None:
    """Probes run only once the gate has been idle for CAKE_LINK_PROBE_S, and a reading taken
    while a chunk read began is not the idle link's: it is dropped."""
    settings = Settings(staging_dir=str(tmp_path / "staging"), link_probe_s=0.05)
    async with ThrottledStore(LocalStore(tmp_path / "store"), bandwidth_MBps=5) as store:
        bus = Published()
        loader = Loader(bus, store, Staging(settings.staging_dir), settings)  # type: ignore[arg-type]
        probe = LinkProbe(store, loader.staging, "n")
        await probe.install()
        await loader.gate.acquire()  # a chunk read in flight: no probe
        task = asyncio.create_task(loader.probe_link(probe))
        await asyncio.sleep(0.3)
        assert bus.sent == []
        await loader.gate.release()
        await asyncio.sleep(0.12)  # idle long enough: a probe (1 MiB at 5 MB/s: 0.2 s) starts
        await loader.gate.acquire()  # and a chunk read begins while it runs
        await asyncio.sleep(0.3)
        assert bus.sent == []
        await loader.gate.release()
        await asyncio.sleep(0.6)
        task.cancel()
        rates = [m.probe_MBps for m in bus.sent if isinstance(m, LoaderTelemetry)]
        assert rates and all(4.0 < r <= 5.0 for r in rates), rates
