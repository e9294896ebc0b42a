"""One contract suite run against every chunk store, plus store-specific behaviour."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.loader.service import store_from_settings
from shared.core.bandwidth import BandwidthTrace
from shared.core.errors import ConfigError, StoreError
from shared.runtime.config import Settings
from shared.storage import (
    ChunkStore,
    LocalStore,
    MemoryStore,
    S3Store,
    ThrottledStore,
    open_store,
)
from shared.storage.base import new_buffer
from shared.storage.local import TMP_PREFIX
from shared.storage.s3 import RANGE_PART_BYTES
from shared.storage.tiered import FAR, NEAR, TieredStore, TierReads

BUCKET = "cake-test"


def key(name: object) -> str:
    """A realistic chunk key (sha256 hex) for a test name."""
    return hashlib.sha256(str(name).encode()).hexdigest()


def now() -> float:
    return asyncio.get_running_loop().time()


async def open_s3(endpoint: str, prefix: str | None = None) -> S3Store:
    store = S3Store(
        BUCKET, prefix=f"t-{uuid.uuid4().hex}/" if prefix is None else prefix, endpoint_url=endpoint
    )
    await store.start()
    await store.ensure_bucket()
    return store


@pytest.fixture(params=["memory", "local", "s3", "throttled", "tiered"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChunkStore]:
    """Every store kind, started and empty."""
    kind = request.param
    s: ChunkStore
    if kind == "memory":
        s = MemoryStore()
    elif kind == "local":
        s = LocalStore(tmp_path / "store")
    elif kind == "s3":
        s = await open_s3(request.getfixturevalue("s3_endpoint"))
    elif kind == "throttled":
        s = ThrottledStore(LocalStore(tmp_path / "store"), bandwidth_MBps=500)
    else:
        s = TieredStore(LocalStore(tmp_path / "near"), MemoryStore())
    async with s:
        yield s


# --- the contract ---------------------------------------------------------------------------


async def test_round_trip(store: ChunkStore) -> None:
    await store.put(key(1), b"hello chunk")
    assert await store.exists(key(1)) is True
    assert await store.get(key(1)) == b"hello chunk"
    if store.usage_bytes() is not None:
        assert store.usage_bytes() == len(b"hello chunk")


async def test_missing_key(store: ChunkStore) -> None:
    assert await store.get(key("absent")) is None
    assert await store.exists(key("absent")) is False


async def test_empty_value_is_not_a_miss(store: ChunkStore) -> None:
    await store.put(key("empty"), b"")
    assert await store.exists(key("empty")) is True
    assert await store.get(key("empty")) == b""


async def test_replace(store: ChunkStore) -> None:
    await store.put(key(1), b"first version")
    await store.put(key(1), b"second")
    assert await store.get(key(1)) == b"second"
    if store.usage_bytes() is not None:
        assert store.usage_bytes() == len(b"second")


async def test_delete(store: ChunkStore) -> None:
    await store.put(key(1), b"x" * 10)
    await store.put(key(2), b"y" * 20)
    await store.delete(key(1))
    assert await store.get(key(1)) is None
    assert await store.exists(key(1)) is False
    assert await store.get(key(2)) == b"y" * 20
    await store.delete(key(1))  # deleting a missing key is not an error
    await store.delete(key("never stored"))
    if store.usage_bytes() is not None:
        assert store.usage_bytes() == 20


async def test_exists_many_and_stored_prefix(store: ChunkStore) -> None:
    keys = [key(i) for i in range(6)]
    for i in (0, 1, 2, 4):
        await store.put(keys[i], bytes([i]) * 8)
    assert await store.exists_many(keys) == [True, True, True, False, True, False]
    assert await store.stored_prefix(keys) == 3
    assert await store.stored_prefix(keys[3:]) == 0
    assert await store.stored_prefix(keys[:3]) == 3
    assert await store.stored_prefix([]) == 0
    assert await store.exists_many([]) == []


async def test_binary_all_byte_values(store: ChunkStore) -> None:
    data = bytes(range(256)) * 4 + bytes(reversed(range(256)))
    await store.put(key("bin"), data)
    got = await store.get(key("bin"))
    assert got == data
    assert got is not None and set(got) == set(range(256))


async def test_large_value(store: ChunkStore) -> None:
    data = os.urandom(5_000_000)
    await store.put(key("big"), data)
    got = await store.get(key("big"))
    assert got is not None and len(got) == len(data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_concurrent_puts_same_key_leave_one_valid_value(store: ChunkStore) -> None:
    values = [bytes([i]) * (10_000 + 997 * i) for i in range(8)]
    await asyncio.gather(*(store.put(key("race"), v) for v in values))
    got = await store.get(key("race"))
    assert got in values
    assert got is not None and len(set(got)) == 1  # not a mix of two writers
    if store.usage_bytes() is not None:
        assert store.usage_bytes() == len(got)


# --- local store ----------------------------------------------------------------------------


def stored_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file())


class RefusingStore(MemoryStore):
    """A far tier that takes no writes (a bucket that is gone)."""

    async def put(self, key: str, data: bytes) -> None:
        raise StoreError("NoSuchBucket")


async def test_a_tiered_store_reads_near_first_and_keeps_near_what_it_fetched_far(
    tmp_path: Path,
) -> None:
    near, far = LocalStore(tmp_path / "near"), MemoryStore()
    async with TieredStore(near, far) as store:
        await far.put(key("far"), b"f" * 1000)  # stored by another node
        await store.put(key("both"), b"b" * 500)
        assert await store.tiers([key("both"), key("far"), key("none")]) == [NEAR, FAR, None]
        assert await store.stored_prefix([key("both"), key("far"), key("none")]) == 2
        view = await store.get_into(key("far"), new_buffer)
        assert view is not None and bytes(view) == b"f" * 1000
        await store.promote(key("far"), view)  # the reader verified it
        near_view = await store.get_into(key("both"), new_buffer)
        assert near_view is not None
        await store.promote(key("both"), near_view)  # read near: nothing to copy
        reads = store.take_reads()
        assert (reads[FAR].reads, reads[FAR].nbytes, reads[NEAR].reads) == (1, 1000, 1)
        assert reads[FAR].busy_s > 0
    async with LocalStore(tmp_path / "near") as reopened:  # closing waited for the copy
        assert await reopened.get(key("far")) == b"f" * 1000
    async with TieredStore(near, far) as store:
        assert await store.tiers([key("far")]) == [NEAR]
        assert await store.get(key("far")) == b"f" * 1000
        assert store.take_reads()[NEAR].reads == 0  # get() is not the loader's read
        await store.delete(key("far"))
        assert not await near.exists(key("far")) and not await far.exists(key("far"))


async def test_a_tiered_store_keeps_a_write_near_when_far_refuses_it(tmp_path: Path) -> None:
    """The near copy serves this node; the chunk still counts as missing where every node
    reads, so the next write-back tries the far tier again."""
    async with TieredStore(LocalStore(tmp_path / "near"), RefusingStore()) as store:
        with pytest.raises(StoreError, match="NoSuchBucket"):
            await store.put(key(1), b"kv")
        assert await store.tiers([key(1)]) == [NEAR]
        assert await store.exists_many([key(1)]) == [True]
        assert await store.shared_many([key(1)]) == [False]


async def test_a_tiered_store_writes_far_when_its_near_tier_refuses(tmp_path: Path) -> None:
    far = MemoryStore()
    async with TieredStore(RefusingStore(), far) as store:
        await store.put(key(1), b"kv")  # the near failure is logged, not raised
        assert await far.get(key(1)) == b"kv"
        assert await store.tiers([key(1)]) == [FAR]


async def test_a_corrupt_copy_is_dropped_only_from_the_tier_that_served_it(tmp_path: Path) -> None:
    """One node's bad disk must not delete the copy every node shares (and a bad far copy is
    dropped far: it was never copied near)."""
    near, far = LocalStore(tmp_path / "near"), MemoryStore()
    async with TieredStore(near, far) as store:
        await store.put(key("n"), b"good")
        await store.get_into(key("n"), new_buffer)  # served near
        await store.drop_corrupt(key("n"))
        assert not await near.exists(key("n")) and await far.get(key("n")) == b"good"
        await store.get_into(key("n"), new_buffer)  # now served far
        await store.drop_corrupt(key("n"))
        assert not await far.exists(key("n"))
        assert not await near.exists(key("n"))  # never promoted


def test_tier_busy_time_is_the_union_of_read_spans() -> None:
    reads = TierReads()
    for start, end in ((0.0, 1.0), (0.5, 1.5), (3.0, 4.0), (3.2, 3.8)):
        reads.read(start, end, 10)
    assert (reads.reads, reads.nbytes) == (4, 40)
    assert reads.busy_s == pytest.approx(2.5)
    assert TierReads().busy_s == 0.0


async def test_loaders_sharing_a_directory_see_each_others_chunks(tmp_path: Path) -> None:
    """Two nodes' loaders on one directory: what one writes the other finds and reads; what one
    deletes the other no longer reports."""
    key = hashlib.sha256(b"shared").hexdigest()
    async with LocalStore(tmp_path) as a, LocalStore(tmp_path) as b:
        assert await b.stored_prefix([key]) == 0
        await a.put(key, b"kv of node a")
        assert await b.exists(key) and await b.stored_prefix([key]) == 1
        assert await b.get(key) == b"kv of node a"
        await a.delete(key)
        assert not await b.exists(key) and await b.get(key) is None


async def test_local_layout_and_no_temp_files_left(tmp_path: Path) -> None:
    async with LocalStore(tmp_path) as store:
        await asyncio.gather(*(store.put(key("k"), bytes([i]) * 5000) for i in range(5)))
        await store.put(key("j"), b"j")
        assert (tmp_path / key("k")[:2] / key("k")).stat().st_size == 5000
        assert (tmp_path / key("j")[:2] / key("j")).read_bytes() == b"j"
        assert stored_files(tmp_path) == sorted([key("k"), key("j")])


@pytest.mark.parametrize("kind", ["memory", "local"])
async def test_lru_eviction_respects_get_recency(kind: str, tmp_path: Path) -> None:
    store: ChunkStore = MemoryStore(3000) if kind == "memory" else LocalStore(tmp_path, 3000)
    async with store:
        for name in "abc":
            await store.put(key(name), name.encode() * 1000)
        assert await store.get(key("a")) == b"a" * 1000  # a is now the most recent
        await store.put(key("d"), b"d" * 1000)
        assert await store.exists_many([key(n) for n in "abcd"]) == [True, False, True, True]
        assert store.usage_bytes() == 3000
        await store.put(key("e"), b"e" * 2000)  # needs two slots: c then a go
        assert await store.exists_many([key(n) for n in "acde"]) == [False, False, True, True]
        assert store.usage_bytes() == 3000
    if kind == "local":
        assert stored_files(tmp_path) == sorted([key("d"), key("e")])


async def test_local_restart_keeps_usage_and_lru_order(tmp_path: Path) -> None:
    async with LocalStore(tmp_path, 4000) as store:
        for name in "abcd":
            await store.put(key(name), name.encode() * 1000)
        await store.get(key("b"))
        await store.get(key("a"))  # recency now: c, d, b, a
    async with LocalStore(tmp_path, 4000) as again:
        assert again.usage_bytes() == 4000
        assert await again.exists_many([key(n) for n in "abcd"]) == [True] * 4
        await again.put(key("e"), b"e" * 1000)
        assert await again.exists_many([key(n) for n in "abcde"]) == [
            True,
            True,
            False,
            True,
            True,
        ]
        await again.put(key("f"), b"f" * 1500)
        assert await again.exists_many([key(n) for n in "abdef"]) == [
            True,
            False,
            False,
            True,
            True,
        ]
        assert again.usage_bytes() == 3500
    async with LocalStore(tmp_path, 2500) as smaller:  # a lower capacity evicts at start
        assert smaller.usage_bytes() == 2500
        assert await smaller.exists_many([key(n) for n in "aef"]) == [False, True, True]


async def test_local_stale_temp_files_removed_and_never_visible(tmp_path: Path) -> None:
    shard = tmp_path / key("x")[:2]
    shard.mkdir(parents=True)
    stale = shard / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    stale.write_bytes(b"half written" * 100)
    (shard / key("x")).write_bytes(b"complete")
    async with LocalStore(tmp_path) as store:
        assert not stale.exists()
        assert store.usage_bytes() == len(b"complete")
        assert await store.get(key("x")) == b"complete"
        with pytest.raises(ValueError):
            await store.get(stale.name)


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        f"{key(1)[:20]}/../{key(1)[:20]}",
        key(1).upper(),
        f"{TMP_PREFIX}{key(1)}",
        "",
        "abc",
        "0" * 129,
        key(1)[:-1] + "g",
    ],
)
async def test_local_invalid_key_rejected(bad: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    async with LocalStore(root) as store:
        with pytest.raises(ValueError):
            await store.put(bad, b"evil")
        for op in (store.get, store.exists, store.delete):
            with pytest.raises(ValueError):
                await op(bad)
    assert stored_files(tmp_path) == []


async def test_local_value_larger_than_capacity_is_skipped(tmp_path: Path) -> None:
    async with LocalStore(tmp_path, 1000) as store:
        await store.put(key("small"), b"s" * 600)
        await store.put(key("huge"), b"h" * 1001)
        assert await store.exists(key("huge")) is False
        assert await store.get(key("small")) == b"s" * 600
        assert store.usage_bytes() == 600
        assert stored_files(tmp_path) == [key("small")]


async def test_local_file_removed_behind_its_back_is_a_miss(tmp_path: Path) -> None:
    async with LocalStore(tmp_path) as store:
        await store.put(key(1), b"v" * 70)
        await store.put(key(2), b"w" * 30)
        (tmp_path / key(1)[:2] / key(1)).unlink()
        assert await store.get(key(1)) is None
        assert await store.exists(key(1)) is False
        assert store.usage_bytes() == 30


async def test_local_use_before_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        await LocalStore(tmp_path).get(key(1))


async def test_local_io_failure_is_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(StoreError):
        await LocalStore(blocker / "store").start()


# --- throttled store ------------------------------------------------------------------------


async def throttled_with(data: dict[str, bytes], **kw: object) -> ThrottledStore:
    inner = MemoryStore()
    for k, v in data.items():
        await inner.put(k, v)
    store = ThrottledStore(inner, **kw)  # type: ignore[arg-type]
    await store.start()
    return store


async def test_throttled_read_takes_at_least_size_over_bandwidth() -> None:
    n, mbps = 400_000, 10.0
    store = await throttled_with({key(1): b"z" * n}, bandwidth_MBps=mbps)
    t0 = now()
    assert await store.get(key(1)) == b"z" * n
    elapsed = now() - t0
    assert elapsed >= n / (mbps * 1e6)  # 40 ms
    assert elapsed < 0.5
    t0 = now()
    assert await store.get(key("missing")) is None  # a miss moves no bytes
    assert now() - t0 < 0.02


async def test_throttled_concurrent_reads_share_the_link() -> None:
    n, mbps = 300_000, 10.0
    single = n / (mbps * 1e6)  # 30 ms
    store = await throttled_with({key(1): b"1" * n, key(2): b"2" * n}, bandwidth_MBps=mbps)
    t0 = now()
    got = await asyncio.gather(store.get(key(1)), store.get(key(2)))
    elapsed = now() - t0
    assert got == [b"1" * n, b"2" * n]
    assert elapsed >= 1.8 * single
    assert elapsed < 0.5


async def test_throttled_trace_switches_bandwidth() -> None:
    n = 300_000  # 100 kB at 1 MB/s during [0, 0.1 s), the rest at 100 MB/s: about 0.102 s
    store = await throttled_with({key(1): b"t" * n}, trace=[(0.0, 1.0), (0.1, 100.0)])
    t0 = now()
    assert await store.get(key(1)) == b"t" * n
    elapsed = now() - t0
    assert elapsed >= 0.1
    assert elapsed < 0.25  # at a constant 1 MB/s it would take 0.3 s


def test_throttled_transfer_end_integrates_the_trace() -> None:
    store = ThrottledStore(MemoryStore(), trace=[(0.0, 1.0), (1.0, 0.0), (2.0, 4.0)])
    # 0.5 MB in [0.5, 1), nothing while the link is down, then 0.5 MB at 4 MB/s
    assert store.transfer_end(0.5, 1_000_000) == pytest.approx(2.125)
    assert store.transfer_end(1.5, 1_000_000) == pytest.approx(2.25)
    assert store.transfer_end(3.0, 2_000_000) == pytest.approx(3.5)
    assert store.transfer_end(0.0, 500_000) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"bandwidth_MBps": 10.0, "trace": [(0.0, 10.0)]},
        {"bandwidth_MBps": 0.0},
        {"trace": []},
        {"trace": [(0.5, 10.0)]},
        {"trace": [(0.0, 10.0), (1.0, 5.0), (1.0, 7.0)]},
        {"trace": [(0.0, 10.0), (1.0, 0.0)]},
        {"trace": [(0.0, -1.0), (1.0, 5.0)]},
    ],
)
def test_throttled_bad_config(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ThrottledStore(MemoryStore(), **kw)  # type: ignore[arg-type]


def test_a_bandwidth_trace_repeats_after_its_period(tmp_path: Path) -> None:
    trace = BandwidthTrace.parse("0:100, 10:10, 20:50")  # repeats after 20 + 10 s by default
    assert trace.period_s == 30
    rates = [trace.rate_MBps(t) for t in (0, 9.9, 10, 25, 30, 41, 55, 3600 + 12)]
    assert rates == [100, 100, 10, 50, 100, 10, 50, 10]
    # 50 MB at 50 MB/s until second 30, then 50 MB at 100 MB/s as the trace starts over
    assert trace.transfer_end(29, 100_000_000) == pytest.approx(30.5)
    lines = tmp_path / "link.trace"
    lines.write_text("# t MBps\n0 100\n10 10  # congested\n\n20 50\n")
    assert BandwidthTrace.parse(str(lines), period_s=60) == BandwidthTrace(trace.steps, 60)
    assert BandwidthTrace.parse("0:5").period_s is None  # one step: a constant link
    down = BandwidthTrace.parse("0:0,1:2")  # down for a second of every two
    assert down.transfer_end(0.5, 3_000_000) == pytest.approx(3.5)


def test_a_step_of_a_periodic_trace_always_ends_after_the_second_asked() -> None:
    """A period that floats cannot hold exactly (0.3 s): at t = 109 x 0.3, t / 0.3 rounds to a
    hair under 109, and the last step's end came out as t itself, so transfer_end looped
    forever (a read through the throttled store hung at 100 % CPU)."""
    trace = BandwidthTrace([(0.0, 5.0), (0.15, 20.0)], 0.3)
    for k in range(1, 20_000):
        t = k * 0.3
        assert trace.step_at(t)[1] > t, t
    t = 109 * 0.3  # 32.699999999999996
    assert trace.rate_MBps(t) == 5.0  # the period's first step
    assert trace.transfer_end(t, 500_000) == pytest.approx(t + 0.1)


@pytest.mark.parametrize(
    ("spec", "period", "why"),
    [
        ("0:100,10", None, "use `t0:MBps"),
        ("fast", None, "use `t0:MBps"),
        ("0:100,10:20", 5.0, "must end after its last step"),
        ("0:0,10:0", None, "needs a step with a rate > 0"),
        ("1:100", None, "must start at second 0"),
    ],
)
def test_a_bad_bandwidth_trace_is_refused(spec: str, period: float | None, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        BandwidthTrace.parse(spec, period)


def test_the_bandwidth_trace_setting() -> None:
    env = {"CAKE_STORE_BANDWIDTH_TRACE": "0:80,5:8", "CAKE_STORE_BANDWIDTH_PERIOD_S": "12"}
    assert Settings.from_env(env).bandwidth_trace() == BandwidthTrace(((0, 80), (5, 8)), 12)
    assert Settings.from_env({"CAKE_STORE_BANDWIDTH_MBPS": "7"}).bandwidth_trace() == (
        BandwidthTrace(((0, 7),))
    )
    assert Settings.from_env({}).bandwidth_trace() is None
    with_epoch = Settings.from_env({**env, "CAKE_STORE_BANDWIDTH_EPOCH": "1700000000.5"})
    assert with_epoch.bandwidth_trace() == BandwidthTrace(((0, 80), (5, 8)), 12, 1700000000.5)
    for name in ("CAKE_STORE_BANDWIDTH_PERIOD_S", "CAKE_STORE_BANDWIDTH_EPOCH"):
        with pytest.raises(ConfigError, match=f"{name} needs CAKE_STORE_BANDWIDTH_TRACE"):
            Settings.from_env({name: "5"})
    with pytest.raises(ConfigError, match="set one"):
        Settings.from_env({**env, "CAKE_STORE_BANDWIDTH_MBPS": "7"})
    with pytest.raises(ConfigError, match="CAKE_STORE_BANDWIDTH_TRACE='0:80,x'"):
        Settings.from_env({"CAKE_STORE_BANDWIDTH_TRACE": "0:80,x"})


async def test_the_loaders_store_follows_the_trace_from_its_start() -> None:
    settings = Settings.from_env(
        {"CAKE_STORE": "memory://", "CAKE_STORE_BANDWIDTH_TRACE": "0:10,0.2:1,0.4:10"}
    )
    store = store_from_settings(settings)
    assert isinstance(store, ThrottledStore)
    await store.inner.put(key(1), b"t" * 500_000)
    async with store:
        started = now()
        await store.get(key(1))  # 0.05 s at 10 MB/s
        fast = now() - started
        await asyncio.sleep(0.25 - (now() - started))
        started = now()
        await store.get(key(1))  # 0.15 s at 1 MB/s (150 kB), the rest at 10 MB/s: ~0.19 s
        slow = now() - started
    assert fast < 0.12 < 0.15 < slow
    late = settings.replace(store_bandwidth_epoch=time.time() - 0.25)  # its clock at 0.25 s
    store = store_from_settings(late)
    assert isinstance(store, ThrottledStore)
    await store.inner.put(key(1), b"t" * 500_000)
    async with store:
        started = now()
        await store.get(key(1))  # in the slow step from the start: ~0.19 s
        assert now() - started > 0.15


# --- S3 store -------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_s3_unreachable_endpoint_fails_fast_with_store_error() -> None:
    store = S3Store(
        BUCKET,
        endpoint_url=f"http://127.0.0.1:{closed_port()}",
        access_key_id="x",
        secret_access_key="y",
        region="us-east-1",
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
        max_attempts=2,
    )
    async with store:
        for call in (store.exists(key(1)), store.get(key(1)), store.put(key(1), b"v")):
            t0 = now()
            with pytest.raises(StoreError, match=r"127\.0\.0\.1"):
                await asyncio.wait_for(call, timeout=10)
            assert now() - t0 < 10


async def test_s3_object_key_is_prefix_plus_key(s3_endpoint: str) -> None:
    a, b, root = [await open_s3(s3_endpoint, p) for p in ("pa/", "pb/", "")]
    try:
        await a.put(key(1), b"in a")
        assert await b.exists(key(1)) is False
        assert await root.get("pa/" + key(1)) == b"in a"
    finally:
        for s in (a, b, root):
            await s.close()


@pytest.mark.parametrize("size", [0, 1, 1000, 1001, 4500])
async def test_s3_reads_a_large_object_as_ranged_parts_of_one_version(
    s3_endpoint: str, size: int
) -> None:
    settings = Settings.from_env(
        {"CAKE_STORE": f"s3://{BUCKET}/t-{uuid.uuid4().hex}", "CAKE_S3_PART_MB": str(1000 / 2**20),
         "CAKE_S3_ENDPOINT": s3_endpoint}
    )  # fmt: skip
    store = store_from_settings(settings)
    assert isinstance(store, S3Store) and store.part_bytes == 1000
    async with store:
        await store.ensure_bucket()
        data = os.urandom(size)
        await store.put(key("big"), data)
        asked: list[tuple[str, bool]] = []
        get = store._get

        async def spy(k: str, byte_range: str | None, version: str | None = None) -> object:
            asked.append((str(byte_range), version is not None))
            return await get(k, byte_range, version)

        store._get = spy  # type: ignore[method-assign]
        assert await store.get(key("big")) == data
        more = [(f"bytes={a}-{min(a + 1000, size) - 1}", True) for a in range(1000, size, 1000)]
        assert asked == [("bytes=0-999", False), *more]


async def test_s3_part_size_zero_reads_each_object_in_one_get(s3_endpoint: str) -> None:
    async with S3Store(BUCKET, endpoint_url=s3_endpoint, part_bytes=0) as store:
        await store.ensure_bucket()
        data = os.urandom(RANGE_PART_BYTES + 1)
        await store.put(key("whole"), data)
        asked: list[str | None] = []
        get = store._get

        async def spy(k: str, byte_range: str | None, version: str | None = None) -> object:
            asked.append(byte_range)
            return await get(k, byte_range, version)

        store._get = spy  # type: ignore[method-assign]
        assert await store.get(key("whole")) == data
        assert asked == [None]
        await store.put(key("empty"), b"")
        assert await store.get(key("empty")) == b""
    other = store_from_settings(Settings(store="memory://"))  # the part size is S3's alone
    assert isinstance(other, MemoryStore)


async def test_s3_a_server_that_ignores_range_still_serves_the_whole_object(
    s3_endpoint: str,
) -> None:
    async with S3Store(BUCKET, endpoint_url=s3_endpoint, part_bytes=1000) as store:
        await store.ensure_bucket()
        data = os.urandom(4500)
        await store.put(key("norange"), data)
        asked: list[str | None] = []
        get = store._get

        async def ignores_range(
            k: str, byte_range: str | None, version: str | None = None
        ) -> object:
            asked.append(byte_range)
            return await get(k, None, version)  # a 200 with the whole object, no Content-Range

        store._get = ignores_range  # type: ignore[method-assign]
        assert await store.get(key("norange")) == data
        assert asked == ["bytes=0-999"]  # no parts asked for


async def test_s3_an_object_replaced_while_read_in_parts_is_an_error(s3_endpoint: str) -> None:
    """Parts are read If-Match the first part's ETag: a value replaced in between is never
    stitched from two versions."""
    store = S3Store(BUCKET, prefix=f"t-{uuid.uuid4().hex}/", endpoint_url=s3_endpoint,
                    part_bytes=1000)  # fmt: skip
    async with store:
        await store.ensure_bucket()
        await store.put(key("v"), b"1" * 3000)
        get = store._get

        async def replaced_after_the_first_part(
            k: str, byte_range: str | None, version: str | None = None
        ) -> object:
            reply = await get(k, byte_range, version)
            if version is None:
                await store.put(key("v"), b"2" * 3000)
            return reply

        store._get = replaced_after_the_first_part  # type: ignore[method-assign]
        with pytest.raises(StoreError, match="get_object"):
            await store.get(key("v"))


async def test_s3_missing_bucket_is_store_error(s3_endpoint: str) -> None:
    async with S3Store(f"no-such-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint) as store:
        with pytest.raises(StoreError, match="no-such-"):
            await store.get(key(1))


async def test_s3_use_before_start_and_close_is_idempotent(s3_endpoint: str) -> None:
    store = S3Store(BUCKET, endpoint_url=s3_endpoint)
    with pytest.raises(RuntimeError):
        await store.exists(key(1))
    await store.close()
    await store.start()
    await store.start()
    await store.close()
    await store.close()


# --- factory --------------------------------------------------------------------------------


def test_open_store_parses_specs(tmp_path: Path) -> None:
    mem = open_store("memory://", capacity_bytes=123)
    assert isinstance(mem, MemoryStore) and mem.capacity_bytes == 123

    s3 = open_store("s3://my-bucket/kv/v1", endpoint_url="http://h:9000", region=None)
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("my-bucket", "kv/v1/", "http://h:9000")
    bare = open_store("s3://bkt")
    assert isinstance(bare, S3Store) and (bare.bucket, bare.prefix) == ("bkt", "")

    url = open_store(f"file://{tmp_path}/a", capacity_bytes=10)
    assert isinstance(url, LocalStore) and url.root == tmp_path / "a"
    assert url.capacity_bytes == 10
    plain = open_store("relative/dir")
    assert isinstance(plain, LocalStore) and plain.root == Path("relative/dir")

    slow = open_store("memory://", bandwidth=5.0)
    assert isinstance(slow, ThrottledStore) and isinstance(slow.inner, MemoryStore)
    assert slow.transfer_end(0.0, 5_000_000) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("ftp://host/x", {}, "unknown store scheme"),
        ("s3://ab", {}, "shorter than 3"),
        ("s3:///prefix", {}, "shorter than 3"),
        ("s3://Bad_Bucket", {}, "invalid S3 bucket"),
        ("", {}, "empty store spec"),
        ("memory://x", {}, "takes no path"),
        ("file://relative", {}, "absolute path"),
        ("memory://", {"endpoint_url": "http://h"}, "non-S3"),
        ("s3://bucket", {"endpoint": "http://h"}, "unknown store options"),
        ("memory://", {"capacity_bytes": -1}, "capacity"),
        ("memory://", {"bandwidth_MBps": 0.0}, "bandwidth"),
    ],
)
def test_open_store_errors(spec: str, options: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_store(spec, **options)  # type: ignore[arg-type]


async def test_open_store_round_trip_through_local(tmp_path: Path) -> None:
    async with open_store(str(tmp_path), capacity_bytes=100, bandwidth=100.0) as store:
        await store.put(key(1), b"x" * 60)
        await store.put(key(2), b"y" * 60)
        assert await store.exists_many([key(1), key(2)]) == [False, True]
        assert store.usage_bytes() == 60
