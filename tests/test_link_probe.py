"""The idle link probe: an idle loader keeps reading how its link changes, and the mergers
learn it."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import uuid
from collections.abc import Awaitable
from pathlib import Path

import pytest

from services.loader.gate import ReadGate
from services.loader.link_probe import LinkPace, LinkProbe
from services.loader.service import Loader
from services.loader.service import build as build_loader
from services.merger.service import Merger
from shared.core.fetch_limit import FetchLimit
from shared.runtime.config import Settings
from shared.runtime.service import running
from shared.storage.local import LocalStore
from shared.storage.memory import MemoryStore
from shared.storage.s3 import S3Store
from shared.storage.staging import Staging
from shared.storage.throttled import ThrottledStore
from shared.wire.bus import Bus
from shared.wire.messages import LoaderTelemetry, Message
from tests.harness import stack_settings


async def test_the_gate_counts_idle_time_from_the_last_read() -> None:
    gate = ReadGate(FetchLimit(2.0, max_limit=2))
    await gate.acquire()
    assert gate.idle_s() == 0.0 and gate.admitted == 1  # a read in flight
    await asyncio.sleep(0.05)
    await gate.release()
    await asyncio.sleep(0.1)
    assert 0.1 <= gate.idle_s() < 0.5


def test_a_reading_scales_the_pace_of_the_reads_before_it() -> None:
    """The first reading after chunk reads anchors their pace; later readings scale it by how
    the link's rate changed; new reads anchor anew. Before any read, a reading says nothing."""
    pace = LinkPace()
    assert pace.probed(10.0) is None  # no chunk read yet: nothing to scale
    pace.saw(4, 0.8)  # 0.2 s a chunk
    pace.saw(0, 0.5)  # busy without a finished read (one still in flight, or failed)
    assert pace.probed(10.0) is None  # the anchor
    assert pace.probed(10.0) == pytest.approx(0.2)
    assert pace.probed(80.0) == pytest.approx(0.025)  # the link rose 8x
    pace.saw(2, 0.1)  # reads at the new pace
    assert pace.probed(80.0) is None
    assert pace.probed(20.0) == pytest.approx(0.2)  # then it fell 4x


async def test_a_probe_reads_at_the_link_s_rate_and_is_stored_again_when_evicted(
    tmp_path: Path,
) -> None:
    async with ThrottledStore(LocalStore(tmp_path / "store"), bandwidth_MBps=4) as store:
        staging = Staging(tmp_path / "staging")
        probe = LinkProbe(store, staging, "n")
        await probe.install()
        rate = await probe.timed_read_MBps()
        assert rate is not None and 2.0 < rate <= 4.0  # 1 MiB at 4 MB/s, and the read's own cost
        await store.delete(probe.key)  # evicted
        assert await probe.timed_read_MBps() is None
        assert await store.exists(probe.key)  # and stored again
        assert await probe.timed_read_MBps() is not None
        await probe.remove()
        assert not await store.exists(probe.key)
        assert staging.usage_bytes() == 0  # nothing left staged


async def test_a_probe_reads_from_s3_too(s3_endpoint: str, tmp_path: Path) -> None:
    """The S3 store reads the probe in one GET into the staged file."""
    bucket = "cake-" + uuid.uuid4().hex[:12]
    async with S3Store(bucket, "kv/", endpoint_url=s3_endpoint) as store:
        await store.ensure_bucket()
        probe = LinkProbe(store, Staging(tmp_path / "staging"), "n")
        await probe.install()
        rate = await probe.timed_read_MBps()
        assert rate is not None and rate > 0
        await probe.remove()
        assert not await store.exists(probe.key)


class Published:
    """Stands in for the bus: keeps what the loader publishes."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def publish(self, _: str, message: Message) -> None:
        self.sent.append(message)


class CountedProbe(LinkProbe):
    """A probe that counts its reads."""

    reads = 0

    async def timed_read_MBps(self) -> float | None:
        self.reads += 1
        return await super().timed_read_MBps()


async def test_an_idle_loader_sends_how_its_link_changed_and_not_while_chunks_are_read(
    tmp_path: Path,
) -> None:
    """Chunk reads took 0.1 s a chunk on a 5 MB/s link, which rises to 20 MB/s at second 3:
    the probes anchor then follow it (0.025 s a chunk). None runs while a chunk read is in
    flight, and a reading a chunk read overlapped is dropped."""
    settings = Settings(staging_dir=str(tmp_path / "staging"), link_probe_s=0.05)
    trace = [(0.0, 5.0), (3.0, 20.0)]  # (slow readings from about 0.9 s to 3 s)
    async with ThrottledStore(LocalStore(tmp_path / "store"), trace=trace) as store:
        bus = Published()
        loader = Loader(bus, store, Staging(settings.staging_dir), settings)  # type: ignore[arg-type]
        probe = CountedProbe(store, loader.staging, "n")
        await probe.install()
        loader.link_pace.saw(4, 0.4)  # the last fetch's reads
        await loader.gate.acquire()  # a chunk read in flight: no probe
        task = asyncio.create_task(loader.probe_link(probe))
        try:
            await asyncio.sleep(0.3)
            assert probe.reads == 0 and bus.sent == []
            await loader.gate.release()
            while probe.reads == 0:  # once idle for 0.05 s, a probe (1 MiB at 5 MB/s: 0.2 s)
                await asyncio.sleep(0.01)
            await loader.gate.acquire()  # and a chunk read begins while it runs
            await asyncio.sleep(0.3)
            assert probe.reads == 1 and bus.sent == []  # its reading was dropped
            await loader.gate.release()
            await asyncio.sleep(3.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    paces = [m.probe_chunk_s for m in bus.sent if isinstance(m, LoaderTelemetry)]
    assert paces[0] == 0.0  # the anchor
    slow = [p for p in paces[1:] if p > 0.05]
    fast = [p for p in paces[1:] if p <= 0.05]
    assert slow and fast and paces[1:] == slow + fast, paces  # slow first, then fast
    assert statistics.median(slow) == pytest.approx(0.1, rel=0.2)
    assert statistics.median(fast) == pytest.approx(0.025, rel=0.4)  # (a 4x rise, not 2.5x)


async def test_a_loader_stores_its_probe_and_removes_it_at_shutdown(
    nats_url: str, tmp_path: Path
) -> None:
    settings = stack_settings(nats_url, tmp_path, link_probe_s=0.2)

    def connect() -> Awaitable[Bus]:
        return Bus.connect(nats_url, "test-loader")

    async with running(build_loader, settings, connect) as loader:
        assert isinstance(loader, Loader) and loader.link_probe is not None
        key = loader.link_probe.key
        assert await loader.store.exists(key)
    async with LocalStore(settings.store) as store:
        assert not await store.exists(key)
    async with running(build_loader, settings.replace(link_probe_s=0.0), connect) as loader:
        assert isinstance(loader, Loader) and loader.link_probe is None  # 0: never


async def test_every_merger_takes_a_probe_reading_as_one_sample_of_the_link() -> None:
    def window(probe_chunk_s: float) -> LoaderTelemetry:
        return LoaderTelemetry(
            node="n", window_s=1.0, reads=0, nbytes=0, read_s=0.0, busy_s=0.0, in_flight=0,
            read_limit=4, stalls=0, failures=0, probe_chunk_s=probe_chunk_s,
        )  # fmt: skip

    merger = Merger(None, Settings())  # type: ignore[arg-type]
    await merger.on_telemetry(window(0.0), "cake.telemetry.loader.n")
    assert merger.estimator.load_s.value is None  # no reading: nothing learnt
    await merger.on_telemetry(window(0.2), "cake.telemetry.loader.n")
    await merger.on_telemetry(window(0.05), "cake.telemetry.loader.n")
    for estimator in (merger.estimator, merger.node_estimator("n")):
        assert estimator.load_s.value == pytest.approx(0.1)  # the geometric mean of the two


class InstantProbe(LinkProbe):
    """A probe whose reading is ready at once (no store)."""

    def __init__(self) -> None:
        self.reads = 0

    async def timed_read_MBps(self) -> float | None:
        self.reads += 1
        return 10.0


async def test_the_probe_loop_ends_when_cancelled_whenever_the_cancel_comes(
    tmp_path: Path,
) -> None:
    """Cancelled at any point of its cycle, even as a reading completes, the loop ends: with
    asyncio.wait_for around the read, Python 3.11 swallowed a cancel that came as the read
    ended, and the loop (and a loader's shutdown) went on for ever."""
    settings = Settings(staging_dir=str(tmp_path / "staging"), link_probe_s=1e-6)
    loader = Loader(Published(), MemoryStore(), Staging(settings.staging_dir), settings)  # type: ignore[arg-type]
    probe = InstantProbe()
    for k in range(200):
        task = asyncio.create_task(loader.probe_link(probe))
        for _ in range(k % 9):  # a different point of the cycle each time
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=1.0)
        if not task.done():
            task.cancel()  # (one more try, so the failure below does not leave it spinning)
        assert task.done(), f"the loop outlived its cancel at point {k % 9} of its cycle"
    assert probe.reads > 0
