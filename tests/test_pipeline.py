"""The services over a real nats-server: modes agree, hits, isolation, failures, message sizes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import torch

from services.compute.job import Job
from services.compute.service import Compute, Work
from services.compute.telemetry import StepWindow
from services.launcher.in_process import Result
from services.loader.service import Loader, probe_store
from services.loader.telemetry import ReadWindow
from services.merger.service import Merger
from shared.core.errors import ConfigError, RemoteError, RequestTimeout, StoreError
from shared.core.keys import KeySpace, PromptChunks, pack_tokens, unpack_tokens
from shared.core.request import KvMode, Sampling
from shared.core.scheduler import Candidate, Phase, Piece, plan_step
from shared.kv.codec import encode_chunk
from shared.kv.engine import fetch_chunk
from shared.runtime.config import Settings
from shared.storage.base import Allocate
from shared.storage.local import LocalStore
from shared.storage.memory import MemoryStore
from shared.storage.staging import Staging
from shared.storage.throttled import ThrottledStore
from shared.storage.tiered import TieredStore
from shared.wire import subjects
from shared.wire.messages import (
    Accepted,
    Cancel,
    ChunkComputed,
    ChunkLoaded,
    ComputeTelemetry,
    Done,
    Failed,
    FetchJob,
    GenerateRequest,
    HeadComputing,
    LoaderTelemetry,
    LookupReply,
    LookupRequest,
    Meet,
    Message,
    Prefilled,
    PrefillJob,
    Space,
    StartHead,
    StoreJob,
    Tokens,
)
from tests.harness import (
    Backend,
    backend,
    default_runner,
    eventually,
    s3_backend,
    stack_settings,
)
from tests.prom import value

M = TypeVar("M", bound=Message)


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(256) for _ in range(n - 1)]


@pytest.fixture
async def local(nats_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    settings = stack_settings(nats_url, tmp_path)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        yield be


@pytest.fixture
async def s3(nats_url: str, tmp_path: Path, s3_endpoint: str) -> AsyncIterator[Backend]:
    async with s3_backend(nats_url, tmp_path, s3_endpoint) as be:
        yield be


async def test_modes_agree_for_no_partial_and_full_hits(s3: Backend) -> None:
    base = prompt(600, seed=1)
    first = await s3.generate(base, kv_mode="compute")  # no hit; writes the prefix back
    assert first.done.hit_tokens == 0 and first.done.chunks_loaded == 0
    partial = base[:400] + prompt(300, seed=2)  # shares 6 chunks of 64 tokens
    full = base + prompt(50, seed=3)  # shares all 9 stored chunks
    for tokens, want_hit in ((base, 9), (partial, 6), (full, 9)):
        # the reference writes back too: a salt of its own keeps it from adding hits here
        ref = await s3.generate(tokens, kv_mode="compute", salt="reference")
        cake = await s3.generate(tokens, kv_mode="cake")
        assert cake.tokens == ref.tokens
        assert cake.done.hit_tokens == want_hit * 64
        # the Cake request wrote back its new chunks: now every usable chunk is stored
        usable = (len(tokens) - 1) // 64
        load = await s3.generate(tokens, kv_mode="load")
        assert load.tokens == ref.tokens
        assert load.done.hit_tokens == usable * 64
        assert (load.done.chunks_loaded, load.done.meet_chunk) == (usable, 0)


async def test_cake_splits_between_both_sides(local: Backend) -> None:
    tokens = prompt(1200, seed=4)
    ref = await local.generate(tokens, kv_mode="compute")
    got = await local.generate(tokens)
    d = got.done
    assert got.tokens == ref.tokens
    assert d.hit_tokens == 18 * 64
    assert d.chunks_loaded + d.meet_chunk == 18
    assert d.chunks_total == 19
    assert d.chunks_computed + d.chunks_loaded == d.chunks_total
    assert d.loaded_tokens == d.chunks_loaded * 64 and d.computed_tokens == d.meet_chunk * 64


async def test_a_compute_only_request_encodes_only_what_the_store_lacks(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compute-only request makes no lookup, so its write-back asks the loader what is
    stored: a prompt stored already encodes nothing (its Done, which waits for the write-back,
    came 0.09 s after its only token at 2,048 tokens when it encoded all 15 chunks again), a
    longer one only its new chunks; both still answer as before."""
    compute = local.services["compute"]
    assert isinstance(compute, Compute)
    starts: list[int] = []
    stage = compute.stage_writeback

    def recorded(job: Any, start: int) -> dict[int, str]:
        starts.append(start)
        return stage(job, start)

    monkeypatch.setattr(compute, "stage_writeback", recorded)
    tokens = prompt(700, seed=41)  # 10 complete chunks of 64
    first = await local.generate(tokens, kv_mode="compute", salt="wb")
    again = await local.generate(tokens, kv_mode="compute", salt="wb")
    longer = await local.generate([*tokens, *prompt(200, seed=42)], kv_mode="compute", salt="wb")
    assert first.tokens == again.tokens
    assert first.marked_last == [False] * 7 + [True]  # the gateway sends its text at once
    assert starts == [0, 10, 10]
    assert (await local.generate(tokens, salt="wb")).done.hit_tokens == 10 * 64
    cake = await local.generate([*tokens, *prompt(200, seed=42)], salt="wb")
    assert cake.done.hit_tokens == 14 * 64 and cake.tokens == longer.tokens


async def test_salt_isolates_the_cache(local: Backend) -> None:
    tokens = prompt(300, seed=5)
    await local.generate(tokens, salt="tenant-a")
    assert (await local.generate(tokens, salt="tenant-b")).done.hit_tokens == 0
    assert (await local.generate(tokens, salt="tenant-a")).done.hit_tokens == 4 * 64


async def test_concurrent_requests_all_complete(local: Backend) -> None:
    prompts = [prompt(200 + 50 * i, seed=10 + i) for i in range(5)]
    refs = [await local.generate(p, kv_mode="compute", max_tokens=6) for p in prompts]
    results = await asyncio.gather(
        *(local.generate(p, kv_mode=m, max_tokens=6) for p in prompts for m in ("cake", "load"))
    )
    for i, res in enumerate(results):
        assert res.tokens == refs[i // 2].tokens
        assert res.done.completion_tokens == 6


class BrokenReads(LocalStore):
    """A local store whose reads fail (mode "error") or hang (mode "stall")."""

    def __init__(self, root: str, mode: str) -> None:
        super().__init__(root)
        self.mode = mode

    async def get_into(self, key: str, allocate: Allocate) -> memoryview | None:
        if self.mode == "stall":
            await asyncio.sleep(3600)
        raise StoreError("disk on fire")


async def test_loader_down_degrades_to_compute(nats_url: str, tmp_path: Path) -> None:
    tokens = prompt(500, seed=20)
    settings = stack_settings(nats_url, tmp_path, rpc_timeout_s=1.0)
    async with LocalStore(settings.store) as store:
        async with backend(settings, store) as be:
            ref = await be.generate(tokens, kv_mode="compute")
        async with backend(settings, store, services=("merger", "compute")) as be:
            for mode in ("cake", "load"):
                res = await be.generate(tokens, kv_mode=mode)
                assert res.tokens == ref.tokens
                assert res.done.hit_tokens == 0  # the lookup went unanswered
                assert res.elapsed_s < 10


@pytest.mark.parametrize("mode", ["error", "stall"])
async def test_failing_or_stalling_storage_is_computed_around(
    nats_url: str, tmp_path: Path, mode: str
) -> None:
    tokens = prompt(500, seed=21)
    settings = stack_settings(nats_url, tmp_path, fetch_timeout_s=1.0)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        ref = await be.generate(tokens, kv_mode="compute")
    broken = BrokenReads(settings.store, mode)
    async with broken, backend(settings, broken) as be:
        for kv_mode in ("cake", "load"):
            res = await be.generate(tokens, kv_mode=kv_mode)
            assert res.tokens == ref.tokens
            assert res.done.hit_tokens == 7 * 64
            assert res.done.chunks_loaded == 0  # nothing loaded: every chunk was computed
            assert res.elapsed_s < 10
        loader = be.services["loader"]
        assert isinstance(loader, Loader)
        assert value(loader.metrics.registry, "cake_load_failures_total") >= 1


async def test_compute_down_fails_fast_with_503(nats_url: str, tmp_path: Path) -> None:
    settings = stack_settings(nats_url, tmp_path, rpc_timeout_s=1.0)
    services = ("merger", "loader")
    async with LocalStore(settings.store) as store, backend(settings, store, services) as be:
        res = await be.generate(prompt(100, seed=22))
    assert isinstance(res.end, Failed)
    assert res.end.status == 503 and "compute" in res.end.message
    assert res.elapsed_s < 5


async def test_corrupt_stored_chunk_is_recomputed_counted_and_deleted(
    local: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = prompt(500, seed=23)
    ref = await local.generate(tokens, kv_mode="compute")
    keys = PromptChunks.of(
        KeySpace(default_runner().fingerprint, default_runner().layout, 64), tokens
    ).keys
    store = local.store
    assert isinstance(store, LocalStore)
    victim = keys[5]
    data = await store.get(victim)
    assert data is not None
    await store.put(victim, data[:-10] + b"\xff" * 10)  # same length, bad checksum
    loader = local.services["loader"]
    assert isinstance(loader, Loader)
    failed: list[bool] = []  # ReadWindow.failed calls (stalled?), whichever window is open
    failed_read = ReadWindow.failed

    def spy(window: ReadWindow, stalled: bool) -> None:
        failed.append(stalled)
        failed_read(window, stalled)

    monkeypatch.setattr(ReadWindow, "failed", spy)
    cuts: list[None] = []  # the read limit's cuts for a failed read (it also moves with the pace)
    monkeypatch.setattr(loader.fetch_limit, "on_failure", lambda: cuts.append(None))
    res = await local.generate(tokens, kv_mode="load")
    assert res.tokens == ref.tokens
    assert res.done.chunks_loaded == 1  # only chunk 6 (above the corrupt one) could be used
    assert value(loader.metrics.registry, "cake_corrupt_chunks_total") == 1
    assert failed == [False]  # one failed read in the telemetry, not a stall,
    assert cuts == []  # and the chunk's fault, not the link's: the read limit is not cut
    assert not await store.exists(victim) or (await store.get(victim)) != data[:-10] + b"\xff" * 10


async def test_the_merge_and_the_suffix_run_in_one_step(local: Backend) -> None:
    """Once the meeting point is known, the loaded chunks join the cache and the suffix is
    computed in the same scheduler step (the merge is no forward pass of its own): a fully
    loaded request with one output token takes one step, and so does a short prompt with
    nothing stored."""
    compute = local.services["compute"]
    assert isinstance(compute, Compute)

    def steps() -> float:
        return value(compute.metrics.registry, "cake_compute_step_seconds_count")

    tokens = prompt(700, seed=35)  # 10 chunks of 64 tokens stored, a 60-token suffix
    await local.generate(tokens, kv_mode="compute")
    before = steps()
    got = await local.generate(tokens, kv_mode="load", max_tokens=1)
    assert got.done.chunks_loaded == 10 and steps() - before == 1
    before = steps()
    await local.generate(prompt(100, seed=36), kv_mode="compute", max_tokens=1)
    assert steps() - before == 1


async def test_a_hit_too_short_to_split_is_prefilled_as_compute_only_would(
    local: Backend,
) -> None:
    """Advised to compute a short hit whole, a Cake request fetches nothing and runs its prompt
    as one prefill: as many compute steps as compute-only takes (no head step of its own, no
    step for the suffix alone); its hit still counts, and its token is compute-only's."""
    compute = local.services["compute"]
    assert isinstance(compute, Compute)

    def steps() -> float:
        return value(compute.metrics.registry, "cake_compute_step_seconds_count")

    tokens = prompt(250, seed=37)  # 3 chunks of 64 tokens, then 58: two steps of 128 tokens
    before = steps()
    ref = await local.generate(tokens, kv_mode="compute", max_tokens=1)  # stores the 3 chunks
    compute_only = steps() - before
    merger = merger_believing(local, compute_chunk_s=0.1, load_chunk_s=0.2)  # saves a chunk
    assert merger.estimator.advise(3).fetch is False
    before = steps()
    got = await local.generate(tokens, max_tokens=1)
    assert got.tokens == ref.tokens
    assert steps() - before == compute_only == 2
    assert (got.done.hit_tokens, got.done.chunks_loaded, got.done.meet_chunk) == (3 * 64, 0, 3)
    registry = merger.metrics.registry
    assert value(registry, "cake_merger_requests_total", kv_mode="cake", outcome="no_fetch") == 1


async def test_no_nats_message_carries_kv(local: Backend) -> None:
    tokens = prompt(1500, seed=24)
    sizes: list[tuple[int, str]] = []
    inbox = await local.client.subscribe(f"{subjects.ROOT}.>")

    async def spy() -> None:
        async for envelope in inbox:
            sizes.append((envelope.nbytes, envelope.subject))

    spying = asyncio.create_task(spy())
    await local.generate(tokens, kv_mode="compute")
    await local.generate(tokens)
    await local.generate(tokens, kv_mode="load")
    await local.client.flush()
    await asyncio.sleep(0.1)
    spying.cancel()
    await inbox.close()
    biggest, subject = max(sizes)
    kv_bytes_per_chunk = 64 * default_runner().layout.layers * 2 * 4 * 64 * 4
    assert len(sizes) > 50
    assert biggest <= 64 * 1024 + 4 * len(tokens), subject
    assert biggest < kv_bytes_per_chunk / 10


async def test_merger_finishes_each_request_promptly(local: Backend) -> None:
    merger = local.services["merger"]
    assert isinstance(merger, Merger)
    for tokens in (prompt(100, seed=30), prompt(100, seed=30)):  # no hit, then a hit
        await local.generate(tokens)
        for _ in range(50):
            if not merger.tasks:
                break
            await asyncio.sleep(0.01)
        assert not merger.tasks, "the merger is still coordinating a finished request"


async def test_a_failing_request_does_not_stop_the_compute_service(local: Backend) -> None:
    compute = local.services["compute"]
    assert isinstance(compute, Compute)
    real = compute.prefill_piece
    calls = 0

    def broken_once(job: Job, tokens: int) -> Work | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("out of memory")
        return real(job, tokens)

    compute.prefill_piece = broken_once  # type: ignore[method-assign]
    failed = await local.generate(prompt(100, seed=40))
    assert isinstance(failed.end, Failed) and failed.end.status == 500
    assert "out of memory" in failed.end.message
    ok = await local.generate(prompt(100, seed=41))
    assert ok.done.completion_tokens == 8


async def test_compute_and_loader_listen_only_to_the_requests_they_hold(local: Backend) -> None:
    """No fan-out: a replica subscribes to a request's control and events subjects while it
    holds the request (never to every request's), and lets go of them when it is done."""
    compute, loader = local.services["compute"], local.services["loader"]
    assert isinstance(compute, Compute) and isinstance(loader, Loader)

    def per_request(service: Compute | Loader) -> list[str]:
        return [s for s in service.bus.handled() if s.startswith("cake.req.")]

    assert per_request(compute) == per_request(loader) == []
    tokens = prompt(400, seed=44)
    await local.generate(tokens, kv_mode="compute")  # stored
    seen: dict[str, set[str]] = {"compute": set(), "loader": set()}

    async def watch() -> None:
        while True:
            seen["compute"].update(per_request(compute))
            seen["loader"].update(per_request(loader))
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        res = await local.generate(tokens, kv_mode="load")
    finally:
        watcher.cancel()
    assert res.done.chunks_loaded > 0
    rid = res.done.request_id
    held = {subjects.control(rid), subjects.cancel(rid), subjects.events(rid)}
    assert seen["compute"] == seen["loader"] == held
    deadline = time.monotonic() + 5  # the loader lets go once its fetch is settled
    while per_request(compute) or per_request(loader):
        assert time.monotonic() < deadline, (per_request(compute), per_request(loader))
        await asyncio.sleep(0.05)


async def test_a_cancel_sent_before_compute_took_the_job_still_drops_it(local: Backend) -> None:
    """Compute listens to a request's control subject only once it holds the job; a Cancel the
    client sent right after the merger accepted the request (during the lookup) reaches compute
    anyway: the merger relays it once compute has taken the job."""
    compute = local.services["compute"]
    assert isinstance(compute, Compute)
    rid = "t-early-cancel"
    sampling = Sampling(max_tokens=500)
    req = GenerateRequest(
        rid, pack_tokens(prompt(300, seed=42)), sampling, deadline=time.time() + 30
    )

    def cancelled() -> float:
        registry = compute.metrics.registry
        return value(registry, "cake_compute_requests_finished_total", finish_reason="cancelled")

    before = cancelled()
    async with await local.client.subscribe(subjects.stream(rid)) as stream:
        await local.client.request(subjects.GENERATE, req, Accepted, 2.0)
        await local.client.publish(subjects.cancel(rid), Cancel(rid, "client went away"))
        deadline = time.monotonic() + 10
        while cancelled() == before:
            assert time.monotonic() < deadline, "the job was not dropped"
            await asyncio.sleep(0.05)
        with pytest.raises(RequestTimeout):
            while True:  # no Done: it was cancelled, not finished
                assert not isinstance((await stream.next(0.5)).message, Done)
    assert rid not in compute.jobs


async def test_a_cancel_during_a_stalled_load_is_not_taken_for_a_slow_link(
    nats_url: str, tmp_path: Path
) -> None:
    """The client cancels while a load-only request's reads hang: the merger ends the request
    as cancelled, and its estimate of the link learns nothing from the stall it caused. No
    more events come once compute and the loader stop: the merger notices the Cancel within
    CANCEL_CHECK_S, not when its 20 s event wait runs out."""
    tokens = prompt(500, seed=46)
    settings = stack_settings(nats_url, tmp_path, fetch_timeout_s=20.0)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        await be.generate(tokens, kv_mode="compute")  # stored
    rid = "t-cancel-stalled"
    req = GenerateRequest(
        rid, pack_tokens(tokens), Sampling(max_tokens=8), KvMode.LOAD, deadline=time.time() + 30
    )
    async with BrokenReads(settings.store, "stall") as stalling, backend(settings, stalling) as be:
        merger = be.services["merger"]
        assert isinstance(merger, Merger)
        link_before = merger.estimator.load_s.value

        def ended(outcome: str) -> float:
            registry = merger.metrics.registry
            return value(registry, "cake_merger_requests_total", kv_mode="load", outcome=outcome)

        await be.client.request(subjects.GENERATE, req, Accepted, 2.0)
        await asyncio.sleep(0.5)  # the fetch is out, its reads hang
        await be.client.publish(subjects.cancel(rid), Cancel(rid, "client went away"))
        cancelled_at = time.monotonic()
        deadline = cancelled_at + 10
        while not ended("cancelled"):
            assert time.monotonic() < deadline, "the merger did not end the request"
            await asyncio.sleep(0.05)
        assert time.monotonic() - cancelled_at < 2.0
        assert ended("stalled") == 0
        assert merger.estimator.load_s.value == link_before


async def test_no_loader_beside_compute_means_compute_everything(
    nats_url: str, tmp_path: Path
) -> None:
    """Compute takes the whole hit, and the lost link counts as slow in every estimate of the
    node (the deployment's and its own), whichever the request was advised from."""
    settings = stack_settings(nats_url, tmp_path, rpc_timeout_s=1.0)
    tokens = prompt(400, seed=43)
    async with LocalStore(settings.store) as store:
        async with backend(settings, store) as be:
            ref = await be.generate(tokens, kv_mode="compute")
        elsewhere = settings.replace(node="another-node")  # answers lookups, not our fetches
        async with (
            backend(settings, store, services=("merger", "compute")) as be,
            backend(elsewhere, store, services=("loader",)),
        ):
            res = await be.generate(tokens)
            merger = be.services["merger"]
    assert res.tokens == ref.tokens
    assert res.done.hit_tokens == 6 * 64 and res.done.chunks_loaded == 0
    assert res.elapsed_s < 5
    assert isinstance(merger, Merger)  # the deployment's estimate and the node's learn it alike
    own = merger.node_estimators[settings.node]
    assert merger.estimator.load_s.value == own.load_s.value == settings.fetch_timeout_s


def test_staging_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    staging = Staging(tmp_path / "staging")
    victim = tmp_path / "precious.kv"
    victim.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="outside the staging area"):
        staging.discard(str(victim))
    with pytest.raises(ValueError, match="outside the staging area"):
        staging.read(str(staging.root / ".." / "precious.kv"))
    assert victim.read_bytes() == b"keep me"


async def test_exact_splits_store_the_kv_of_chunk_by_chunk_prefill(
    nats_url: str, tmp_path: Path
) -> None:
    settings = stack_settings(nats_url, tmp_path, exact_splits=True)
    tokens = prompt(300, seed=44)
    runner = default_runner()
    chunks = PromptChunks.of(KeySpace(runner.fingerprint, runner.layout, 64), tokens)
    cache = runner.new_cache()
    runner.prefill_chunks(cache, tokens, 64)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        await be.generate(tokens, kv_mode="compute")  # token budget 128: two chunks a step
        for i in range(4):
            stored = await fetch_chunk(store, chunks, i)
            assert stored is not None
            assert torch.equal(stored, runner.chunk_kv(cache, i * 64, (i + 1) * 64)), i


def test_boolean_settings_parse() -> None:
    from shared.core.errors import ConfigError

    assert Settings.from_env({"CAKE_EXACT_SPLITS": "1"}).exact_splits is True
    assert Settings.from_env({"CAKE_EXACT_SPLITS": "false"}).exact_splits is False
    with pytest.raises(ConfigError, match="not a boolean"):
        Settings.from_env({"CAKE_EXACT_SPLITS": "maybe"})


async def test_int8_codec_stores_half_the_bytes_and_still_hits(
    nats_url: str, tmp_path: Path
) -> None:
    tokens = prompt(400, seed=45)
    sizes = {}
    for codec in ("raw", "int8"):
        settings = stack_settings(nats_url, tmp_path / codec, kv_codec=codec)
        async with LocalStore(settings.store) as store, backend(settings, store) as be:
            await be.generate(tokens, kv_mode="compute")
            again = await be.generate(tokens, kv_mode="load")
            assert again.done.chunks_loaded == 6 and again.done.completion_tokens == 8
            sizes[codec] = store.usage_bytes()
    # float32 KV: int8 values plus a float32 scale per 64 values, about 0.27 of the raw bytes
    assert sizes["int8"] < 0.3 * sizes["raw"]


async def heard(be: Backend, subject: str, kind: type[M]) -> list[M]:
    """The messages of `kind` on subject from now on, as the client hears them."""
    got: list[M] = []

    async def on_message(message: Message, _: str) -> None:
        if isinstance(message, kind):
            got.append(message)

    await be.client.handle(subject, on_message)
    await be.client.flush()
    return got


@asynccontextmanager
async def over_a_slow_link(
    nats_url: str, tmp_path: Path, tokens: list[int], chunk_s: float, **changes: object
) -> AsyncIterator[tuple[Result, Backend]]:
    """The compute-only answer for tokens (whose 10 usable chunks it stores), then services
    (with these settings changed) whose store delivers a chunk every chunk_s seconds."""
    settings = stack_settings(nats_url, tmp_path, **changes)
    async with LocalStore(settings.store) as store:
        async with backend(settings, store) as be:
            ref = await be.generate(tokens, kv_mode="compute")  # and written back
        usage = store.usage_bytes()
        assert usage is not None
        slow = ThrottledStore(store, bandwidth_MBps=usage / 10 / 1e6 / chunk_s)
        async with slow, backend(settings, slow) as be:
            yield ref, be


async def test_loaded_chunks_are_placed_as_they_arrive(nats_url: str, tmp_path: Path) -> None:
    """Over a slow link, chunks arrive tail first (the node's read gate admits workers in any
    order, but each takes the next chunk once admitted) and compute copies each into its slot
    when it arrives, so the merge at the meeting point copies (almost) nothing; the tokens are
    compute-only's."""
    tokens = prompt(700, seed=30)  # 10 usable chunks
    async with over_a_slow_link(nats_url, tmp_path, tokens, chunk_s=0.05) as (ref, be):
        loaded = await heard(be, subjects.EVENTS_ALL, ChunkLoaded)
        got = await be.generate(tokens, kv_mode="load")
        order = [event.index for event in loaded]
        registry = be.services["compute"].metrics.registry  # type: ignore[attr-defined]
    assert got.tokens == ref.tokens and got.done.chunks_loaded == 10
    assert sorted(order) == list(range(10))
    # tail first: concurrent reads (4 at once) may swap neighbours, never more
    assert all(abs(index - (9 - k)) < 4 for k, index in enumerate(order)), order
    arrival = value(registry, "cake_compute_loaded_chunks_total", placed="on_arrival")
    merge = value(registry, "cake_compute_loaded_chunks_total", placed="at_merge")
    assert arrival + merge == 10 and arrival >= 8


async def test_a_forged_chunk_is_refused_under_a_cluster_secret(
    nats_url: str, tmp_path: Path
) -> None:
    """With CAKE_KV_SECRET set, a chunk planted by someone who can write to the store (right
    header, right checksum, other KV) is refused and deleted; the answer is compute-only's."""
    tokens = prompt(500, seed=31)
    settings = stack_settings(nats_url, tmp_path, kv_secret="s3cret")
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        ref = await be.generate(tokens, kv_mode="compute")  # stores 7 MAC'd chunks
        compute = be.services["compute"]
        assert isinstance(compute, Compute)
        prompt_chunks = PromptChunks.of(
            KeySpace(compute.runner.fingerprint, compute.runner.layout, 64), tokens
        )
        victim = prompt_chunks.keys[0]  # the head: the loads above it still count
        ident = prompt_chunks.identity(0)
        await store.put(victim, encode_chunk(ident, torch.zeros(ident.layout.chunk_shape(64))))
        got = await be.generate(tokens, kv_mode="load")
        assert got.tokens == ref.tokens
        assert got.done.chunks_loaded == 6  # the forged first one was refused and computed
        assert not await store.exists(victim)


def merger_believing(be: Backend, compute_chunk_s: float, load_chunk_s: float) -> Merger:
    """The backend's merger, believing a head chunk and a loaded chunk take these seconds."""
    merger = be.services["merger"]
    assert isinstance(merger, Merger)
    merger.estimator.observe_compute(2, 2 * compute_chunk_s)
    merger.estimator.observe_loads(1, load_chunk_s)
    return merger


async def test_a_load_only_plan_whose_loads_fall_behind_computes_the_head(
    nats_url: str, tmp_path: Path
) -> None:
    """The estimator expects a fast link and advises load-only; the link delivers a chunk a
    second instead: once no chunk came for 4x the expected pace, compute starts the head and
    the two sides meet, long before the loads alone would finish (about 10 s)."""
    tokens = prompt(700, seed=32)  # 10 usable chunks
    async with over_a_slow_link(nats_url, tmp_path, tokens, chunk_s=1.0) as (ref, be):
        merger = merger_believing(be, compute_chunk_s=1.0, load_chunk_s=0.01)  # load-only
        got = await be.generate(tokens)
        registry = merger.metrics.registry
    assert got.tokens == ref.tokens
    assert got.first_token_s is not None and got.first_token_s < 5.0
    assert got.done.meet_chunk > 0  # compute took part of the head
    assert value(registry, "cake_merger_advice_total", advice="skip_head") == 1
    assert (
        value(registry, "cake_merger_requests_total", kv_mode="cake", outcome="resumed_head") == 1
    )
    # no chunk came while 4 reads were in flight, for as long as the head took (about 0.7 s)
    assert merger.estimator.load_s.value is not None and merger.estimator.load_s.value >= 0.1
    assert merger.estimator.advise(10).compute_head  # the next request splits


async def test_a_resumed_head_steps_to_where_it_meets_the_loads_at_their_pace(
    nats_url: str, tmp_path: Path
) -> None:
    """Load-only advised on a link believed instant that delivers a chunk each 0.2 s: once the
    merger sees the pace, its StartHead says where a head chunk of 0.2 s (what it believes)
    meets loads at that pace: half-way from the loads' frontier, give or take a chunk. The
    head's first step goes there (without the hint it would go to the loads, 8 chunks or
    more), and the answer is compute-only's."""
    tokens = prompt(700, seed=33)  # 10 usable chunks
    budget = 1024  # a step may take a whole head step (8 chunks of 64 tokens)
    async with over_a_slow_link(nats_url, tmp_path, tokens, 0.2, token_budget=budget) as (ref, be):
        merger_believing(be, compute_chunk_s=0.2, load_chunk_s=0.001)  # load-only advised
        resumed = await heard(be, subjects.CONTROL_ALL, StartHead)
        steps = await heard(be, subjects.EVENTS_ALL, ChunkComputed)
        got = await be.generate(tokens)
        computed = [event.upto for event in steps]
    assert got.tokens == ref.tokens
    assert len(resumed) == 1
    # frontier F of 6-10 by then, a pace of 0.2 s or more (0.25 s and the watcher's lag when
    # no chunk came yet): ceil(F x pace / (0.2 + pace)) is 3-7, short of the loads' 8 or more
    assert 3 <= resumed[0].head_hint <= 7
    assert computed and computed[0] == resumed[0].head_hint


async def test_a_head_hinted_by_a_stale_estimate_probes_one_chunk_first(
    nats_url: str, tmp_path: Path
) -> None:
    """The estimate says the two sides meet at chunk 7 (a loaded chunk believed to take twice a
    computed one) while the link delivers a chunk each 30 ms: the head's first step is one
    chunk, not a whole head step of 8, so little is committed before the loads' own pace shows.
    The answer is compute-only's."""
    tokens = prompt(700, seed=36)  # 10 usable chunks
    async with over_a_slow_link(nats_url, tmp_path, tokens, 0.03) as (ref, be):  # all in 0.3 s
        merger_believing(be, compute_chunk_s=0.05, load_chunk_s=0.1)
        steps = await heard(be, subjects.EVENTS_ALL, ChunkComputed)
        announced = await heard(be, subjects.EVENTS_ALL, HeadComputing)
        got = await be.generate(tokens)
        computed = [event.upto for event in steps]
    assert got.tokens == ref.tokens
    assert computed and computed[0] == 1
    assert got.done.meet_chunk <= 7
    compute = be.services["compute"]
    assert isinstance(compute, Compute)  # the probe was a step of one chunk: its cost is known
    step_s = compute.token_pace.chunk_step_s
    assert step_s is not None and step_s > 0
    assert value(compute.metrics.registry, "cake_compute_chunk_step_seconds") > 0
    assert set(computed) <= {event.upto for event in announced}  # each head step, as it began


async def test_a_head_step_that_never_ends_is_not_taken_for_a_slow_link(
    nats_url: str, tmp_path: Path
) -> None:
    """The head's step after its probe fails: compute ends the request, while the loader, told
    the step computes chunks [0, upto), stopped there. The merger hears nothing more and gives
    up after CAKE_FETCH_TIMEOUT_S, but the step it heard of never ended, so the wait is
    compute's and the node's link is not marked slow for it (a stall that is the loads' own is:
    test_faults.py)."""
    tokens = prompt(700, seed=38)  # 10 usable chunks
    async with over_a_slow_link(nats_url, tmp_path, tokens, 0.1, fetch_timeout_s=1.5) as (
        _, be,
    ):  # fmt: skip
        merger = merger_believing(be, compute_chunk_s=0.05, load_chunk_s=0.1)
        compute = be.services["compute"]
        assert isinstance(compute, Compute)
        real, steps, blamed = compute.head_work, [], []

        def failing_after_the_probe(job: Job, chunks: int) -> Work:
            steps.append(chunks)
            if len(steps) > 1:  # (the loader may not listen yet when the probe is announced)
                raise RuntimeError("the device fell off the bus")
            return real(job, chunks)

        compute.head_work = failing_after_the_probe  # type: ignore[method-assign]
        merger.link_lost = blamed.append  # type: ignore[method-assign]
        announced = await heard(be, subjects.EVENTS_ALL, HeadComputing)
        failed = await be.generate(tokens)
        assert isinstance(failed.end, Failed) and "fell off" in failed.end.message
        deadline = time.monotonic() + 6  # the merger's no-progress wait is 1.5 s
        while merger.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert len(announced) == 2
        assert not merger.tasks and blamed == []


@pytest.mark.parametrize(
    "word",
    [
        HeadComputing("cmpl-head-computing", 6),  # a step computes [0, 6)
        ChunkComputed("cmpl-head-computing", 6, 0.0, reused=True),  # from the memory tier
    ],
)
async def test_the_loader_does_not_read_chunks_a_head_step_is_computing(
    nats_url: str, tmp_path: Path, word: Message
) -> None:
    """A fetch of 10 chunks over a link that delivers one each 0.1 s, 4 read at once: once
    HeadComputing says a step computes chunks [0, 6), or ChunkComputed that they are computed
    (a head that took them from compute's memory tier ran no step to announce), the loader
    finishes the reads it has begun and starts no read below 6 (computed chunks win any
    overlap, so such a read would only slow the link and the CPU the step runs on); it leaves
    the last word to Meet."""
    tokens = prompt(700, seed=37)  # 10 usable chunks
    async with over_a_slow_link(nats_url, tmp_path, tokens, 0.1) as (_, be):
        loader = be.services["loader"]
        assert isinstance(loader, Loader)
        loaded = await heard(be, subjects.EVENTS_ALL, ChunkLoaded)
        runner, rid = default_runner(), "cmpl-head-computing"
        space = Space.of(KeySpace(runner.fingerprint, runner.layout, 64))
        job = FetchJob(rid, pack_tokens(tokens), space, 10, time.time() + 30)
        fetch = subjects.fetch(loader.settings.node)
        await be.client.request(fetch, job, Accepted, 5.0)
        await be.client.publish(subjects.events(rid), word)
        await asyncio.sleep(1.5)  # all 10 would have come by now
        await be.client.publish(subjects.control(rid), Meet(rid, 6, 10))
    indexes = sorted(event.index for event in loaded)
    assert indexes[0] >= 5 and indexes[-1] == 9, indexes  # (a read begun may end below 6)


async def test_a_long_prefill_steps_around_a_request_waiting_for_its_loads(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Cake request advised load-only waits for its loads (a chunk each 0.1 s) while a long
    prompt arrives that the budget would run in one step. Its steps end by the time the loads
    are due instead (at a prompt token's cost fixed here at 10 ms: one chunk a step), and the
    step that ends the Cake request's prompt carries none of the long one, which came after it.
    Both answers are compute-only's."""
    import services.compute.service as compute_module

    tokens, long = prompt(700, seed=34), prompt(2000, seed=35)
    async with over_a_slow_link(nats_url, tmp_path, tokens, 0.1, token_budget=2048) as (ref, be):
        long_ref = await be.generate(long, kv_mode="compute", salt="first")
        merger_believing(be, compute_chunk_s=1.0, load_chunk_s=0.001)  # load-only advised
        compute = be.services["compute"]
        assert isinstance(compute, Compute)
        compute.token_pace.seconds = 0.01
        monkeypatch.setattr(compute.token_pace, "observe", lambda *_: None)
        steps: list[tuple[list[Candidate], dict[str, int]]] = []

        def recorded(
            candidates: list[Candidate], budget: int, *args: Any, **kw: Any
        ) -> list[Piece]:
            step = plan_step(candidates, budget, *args, **kw)
            steps.append((candidates, {p.request_id: p.tokens for p in step}))
            return step

        monkeypatch.setattr(compute_module, "plan_step", recorded)
        cake = asyncio.create_task(be.generate(tokens))
        in_flight = compute.settings.fetch_concurrency  # more arrivals than that: a pace
        while not any(len(job.load_arrivals) > in_flight for job in compute.jobs.values()):
            await asyncio.sleep(0.01)
        waiting = next(iter(compute.jobs))
        got_long = await be.generate(long, kv_mode="compute", salt="second")
        got = await cake
    assert got.tokens == ref.tokens and got_long.tokens == long_ref.tokens
    while_waiting = [
        g for cands, g in steps
        if any(c.request_id == waiting and c.phase == Phase.WAITING for c in cands)
        and set(g) - {waiting}
    ]  # fmt: skip
    assert while_waiting and all(sum(g.values()) <= 64 for g in while_waiting)
    ending = [
        g for cands, g in steps
        if any(c.request_id == waiting and c.ends_loaded_prompt and g.get(waiting) for c in cands)
    ]  # fmt: skip
    assert len(ending) == 1 and set(ending[0]) == {waiting}  # the long prompt waits a step
    others = [c for cands, _ in steps for c in cands if c.request_id != waiting]
    assert others and not any(c.ends_loaded_prompt for c in others)  # it loaded nothing


async def test_services_check_what_comes_over_nats(local: Backend) -> None:
    """A client on the bus cannot make compute hold a job past the limits, make a loader hash a
    prompt in 1-token chunks, or make a loader store or delete another request's staged file."""
    compute = local.services["compute"]
    assert isinstance(compute, Compute)
    space = Space.of(KeySpace(compute.runner.fingerprint, compute.runner.layout, 64))
    tokens = pack_tokens(prompt(300, seed=40))
    deadline = time.time() + 30
    bad_jobs = {
        "max_tokens must be in": PrefillJob(
            "r-big", tokens, space, 0, True, Sampling(max_tokens=10**6), deadline
        ),
        "chunks of this replica hold 64": PrefillJob(
            "r-tiny", tokens, msgspec.structs.replace(space, chunk_tokens=1), 0, True,
            Sampling(), deadline,
        ),
        "hit 99 is not": PrefillJob("r-hit", tokens, space, 99, True, Sampling(), deadline),
        "logit_bias keys must be token ids below the vocabulary size": PrefillJob(
            "r-bias", tokens, space, 0, True, Sampling(logit_bias=((10**6, 1.0),)), deadline
        ),
        "presence_penalty must be between -2 and 2": PrefillJob(
            "r-penalty", tokens, space, 0, True, Sampling(presence_penalty=1e9), deadline
        ),
    }  # fmt: skip
    for why, job in bad_jobs.items():
        with pytest.raises(RemoteError, match=why):
            await local.client.request(subjects.COMPUTE_PREFILL, job, Accepted, 2.0)
    tiny = msgspec.structs.replace(space, chunk_tokens=1)
    with pytest.raises(RemoteError, match="chunks here hold 64"):
        await local.client.request(
            subjects.LOOKUP, LookupRequest("r-look", tiny, tokens), LookupReply, 2.0
        )
    staging = Staging(local.settings.staging_dir)
    victim = staging.write("someone-else", "0.kv", b"their chunk")
    forged = StoreJob("r-store", tokens, space, {0: victim})
    with pytest.raises(RemoteError, match="not staged for request r-store"):
        await local.client.request(subjects.store(local.settings.node), forged, Accepted, 2.0)
    assert Path(victim).read_bytes() == b"their chunk"


async def test_a_fresh_stack_splits_its_first_request_from_what_services_measured(
    local: Backend,
) -> None:
    """Compute's chunk cost (measured when its model loads) comes with ModelInfo and the
    loader's probed read rate with each lookup: the merger's very first Cake request gets real
    advice, not none."""
    tokens = prompt(700, seed=41)  # 10 usable chunks
    compute, loader, merger = (local.services[n] for n in ("compute", "loader", "merger"))
    assert isinstance(compute, Compute) and isinstance(loader, Loader)
    assert isinstance(merger, Merger)
    # what build() measures when a service starts (the harness builds them without it)
    compute.chunk_compute_s = compute.runner.measure_chunk_s(64, 128)
    loader.read_MBps = await probe_store(local.store, local.settings)
    assert compute.chunk_compute_s > 0 and loader.read_MBps > 0
    await local.generate(tokens, kv_mode="compute")  # stores the prompt; no estimate is fed
    assert merger.estimator.load_s.value is None
    got = await local.generate(tokens)
    advice = {a: value(merger.metrics.registry, "cake_merger_advice_total", advice=a)
              for a in ("skip_head", "no_fetch", "hint", "none")}  # fmt: skip
    assert advice["none"] == 0 and sum(advice.values()) == 1
    assert got.done.hit_tokens == 10 * 64


async def test_the_loader_refuses_a_store_it_cannot_write(tmp_path: Path) -> None:
    class ReadOnly(LocalStore):
        async def put(self, key: str, data: bytes) -> None:
            raise StoreError("permission denied")

    settings = Settings(store=str(tmp_path / "store")).validated()
    async with ReadOnly(settings.store) as store:
        with pytest.raises(ConfigError, match="cannot write to and read from its store"):
            await probe_store(store, settings)
    async with LocalStore(settings.store) as store:
        assert await probe_store(store, settings) > 0
        assert store.usage_bytes() == 0  # the probe is gone


async def test_a_loader_with_a_near_tier_probes_each_tier(nats_url: str, tmp_path: Path) -> None:
    from contextlib import AsyncExitStack

    from services.loader.service import build
    from shared.wire.bus import Bus

    settings = stack_settings(nats_url, tmp_path, store="memory://",
                              store_cache=str(tmp_path / "near"), store_cache_gb=1.0)  # fmt: skip
    bus = await Bus.connect(nats_url, "test-near-tier")
    async with AsyncExitStack() as resources:
        loader = await build(bus, settings, resources)
        assert isinstance(loader.store, TieredStore)
        assert isinstance(loader.store.near, LocalStore)
        assert isinstance(loader.store.far, MemoryStore)
        assert loader.store.near.capacity_bytes == 10**9
        assert loader.read_MBps > 0 and loader.near_read_MBps > 0
        assert loader.store.usage_bytes() == 0  # both probes are gone
    await bus.close()


async def test_a_job_the_merger_never_answers_goes_on_alone(nats_url: str, tmp_path: Path) -> None:
    """NATS delivers at most once: if the merger's word is lost (or the merger dies), a
    load-only job does not wait for its deadline but computes the head itself once it has
    waited as long as the merger would (a fetch timeout and two hops), and its output is exact."""
    settings = stack_settings(nats_url, tmp_path, fetch_timeout_s=1.0, rpc_timeout_s=0.5)
    async with LocalStore(settings.store) as store, backend(settings, store, ("compute",)) as be:
        compute = be.services["compute"]
        assert isinstance(compute, Compute)
        space = Space.of(KeySpace(compute.runner.fingerprint, compute.runner.layout, 64))
        tokens = pack_tokens(prompt(300, seed=44))

        async def run(rid: str, hit: int, compute_head: bool) -> tuple[list[int], float]:
            job = PrefillJob(
                rid, tokens, space, hit, compute_head, Sampling(max_tokens=4), time.time() + 30
            )
            started = time.monotonic()
            out: list[int] = []
            async with await be.client.subscribe(subjects.stream(rid)) as inbox:
                await be.client.request(subjects.COMPUTE_PREFILL, job, Accepted, 2.0)
                while not isinstance(msg := (await inbox.next(20.0)).message, Done | Failed):
                    if isinstance(msg, Tokens):
                        out += unpack_tokens(msg.tokens)
            assert isinstance(msg, Done), msg
            return out, time.monotonic() - started

        reference, _ = await run("r-alone-ref", 0, True)
        alone, waited = await run("r-alone", 4, False)  # load-only, and no merger, no loads
    assert alone == reference
    assert waited >= 2.0  # it waited as long as the merger would have
    assert (
        value(compute.registry(), "cake_compute_went_on_alone_total", decided="computes_head") == 1
    )


async def test_a_job_whose_loads_reach_its_head_goes_on_without_the_merger_s_meet(
    nats_url: str, tmp_path: Path
) -> None:
    """Once every chunk from its head on is staged, the meeting point is where the head is
    (the merger's rule): compute merges at once, not after the Meet's round trip, and the
    loader ends the fetch (and removes what lies below the meet) without it: NATS may lose
    it. Here
    no merger runs, so no Meet comes: a load-only job (and a racing head) has its first token
    without going on alone (after 2 s), with compute-only's tokens and every hit chunk
    loaded, and the loader lets go of it long before its deadline (30 s)."""
    settings = stack_settings(nats_url, tmp_path, fetch_timeout_s=1.0, rpc_timeout_s=0.5)
    tokens = prompt(300, seed=45)  # 4 usable chunks
    async with LocalStore(settings.store) as store:
        async with backend(settings, store) as be:
            ref = await be.generate(tokens, kv_mode="compute")  # and written back
        async with backend(settings, store, ("compute", "loader")) as be:
            compute, loader = be.services["compute"], be.services["loader"]
            assert isinstance(compute, Compute) and isinstance(loader, Loader)
            space = Space.of(KeySpace(compute.runner.fingerprint, compute.runner.layout, 64))

            async def run(rid: str, compute_head: bool) -> tuple[list[int], Prefilled, float]:
                job = PrefillJob(
                    rid, pack_tokens(tokens), space, 4, compute_head,
                    Sampling(max_tokens=len(ref.tokens)), time.time() + 30,
                )  # fmt: skip
                started, out, prefilled, ttft = time.monotonic(), [], None, 0.0
                async with await be.client.subscribe(subjects.stream(rid)) as inbox:
                    await be.client.request(subjects.COMPUTE_PREFILL, job, Accepted, 2.0)
                    fetch = FetchJob(rid, job.tokens, space, 4, job.deadline)
                    await be.client.request(subjects.fetch(settings.node), fetch, Accepted, 2.0)
                    while not isinstance(msg := (await inbox.next(20.0)).message, Done | Failed):
                        if isinstance(msg, Tokens):
                            out += unpack_tokens(msg.tokens)
                        elif isinstance(msg, Prefilled):
                            prefilled, ttft = msg, time.monotonic() - started
                assert isinstance(msg, Done) and prefilled is not None, msg
                async with asyncio.timeout(2.0):  # the loader let go of it
                    while rid in loader.fetches:
                        await asyncio.sleep(0.02)
                return out, prefilled, ttft

            loaded, prefilled, took = await run("r-no-meet", False)
            raced, _, raced_took = await run("r-no-meet-head", True)
    assert loaded == raced == ref.tokens
    assert prefilled.chunks_loaded == 4  # met at chunk 0: every hit chunk came from the loads
    assert took < 2.0 and raced_took < 2.0  # going on alone would take 2 s (and count below)
    went_on_alone = value(
        compute.registry(), "cake_compute_went_on_alone_total", decided="computes_head"
    )
    assert went_on_alone == 0


async def test_without_controllers_cake_runs_on_fixed_settings(
    nats_url: str, tmp_path: Path
) -> None:
    """CAKE_CONTROLLERS=false (the ablation): whatever the services measured, every Cake request
    races the head in fixed steps from chunk 0 with no hint, and the loader's read limit stays
    at CAKE_FETCH_CONCURRENCY."""
    settings = stack_settings(nats_url, tmp_path, controllers=False, fetch_concurrency=3)
    tokens = prompt(700, seed=45)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        compute, loader, merger = (be.services[n] for n in ("compute", "loader", "merger"))
        assert isinstance(compute, Compute) and isinstance(loader, Loader)
        assert isinstance(merger, Merger)
        compute.chunk_compute_s = compute.runner.measure_chunk_s(64, 128)
        loader.read_MBps = await probe_store(be.store, be.settings)
        reference = await be.generate(tokens, kv_mode="compute")
        merger.estimator.compute_s.add(1.0)  # a link 100x faster than compute: skip the head,
        merger.estimator.load_s.add(0.01)  # were the controllers on
        results = [await be.generate(tokens) for _ in range(2)]
    advice = {a: value(merger.metrics.registry, "cake_merger_advice_total", advice=a)
              for a in ("skip_head", "no_fetch", "hint", "none")}  # fmt: skip
    assert advice == {"skip_head": 0, "no_fetch": 0, "hint": 0, "none": 2}
    assert all(r.tokens == reference.tokens and r.done.hit_tokens == 10 * 64 for r in results)
    assert loader.fetch_limit.slots == 3
    assert (loader.fetch_limit.min_limit, loader.fetch_limit.max_limit) == (3, 3)


async def test_compute_and_loader_publish_telemetry_that_the_merger_learns_from(
    nats_url: str, tmp_path: Path
) -> None:
    settings = stack_settings(nats_url, tmp_path, telemetry_s=0.2)
    tokens = prompt(700, seed=46)  # 10 usable chunks
    got: list[Message] = []

    async def collect(message: Message, subject: str) -> None:
        got.append(message)
        assert subject == subjects.telemetry(type(message).__name__[:-9].lower(), settings.node)

    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        merger = be.services["merger"]
        assert isinstance(merger, Merger)
        await be.client.handle(subjects.TELEMETRY_ALL, collect)
        await be.generate(tokens, kv_mode="compute")  # stores the prompt
        await asyncio.sleep(0.5)
        assert merger.estimator.load_s.value is None  # nothing was read yet
        cake = await be.generate(tokens)

        def windows(kind: type[M]) -> list[M]:
            return [m for m in got if isinstance(m, kind)]

        await eventually(
            lambda: len(windows(ComputeTelemetry)) >= 5 and len(windows(LoaderTelemetry)) >= 5
            and sum(m.reads for m in windows(LoaderTelemetry)) >= cake.done.chunks_loaded
            and merger.estimator.load_s.value is not None,
            "the windows with the Cake request's reads, heard by the merger",
        )  # fmt: skip
    computes, loaders = windows(ComputeTelemetry), windows(LoaderTelemetry)
    assert len(computes) >= 5 and len(loaders) >= 5  # every 0.2 s, busy or not
    assert all(m.node == settings.node and 0.1 < m.window_s < 1.0 for m in computes + loaders)
    assert sum(m.tokens["prefill"] for m in computes) >= 700  # the compute-only prefill
    assert sum(m.head_chunks for m in computes) <= cake.done.meet_chunk  # (the rest: PREFILL)
    assert sum(m.reads for m in loaders) >= cake.done.chunks_loaded > 0
    assert sum(m.busy_s for m in loaders) > 0 and all(m.read_limit >= 1 for m in loaders)
    assert merger.estimator.load_s.value is not None


async def test_a_near_tier_is_filled_by_verified_reads_and_its_pace_learned(
    nats_url: str, tmp_path: Path
) -> None:
    """CAKE_STORE_CACHE: a local directory in front of the store. Chunks another node stored
    are loaded from the store (the far tier), copied near once verified, and found near by the
    next lookup; the loader's telemetry reports each tier and the merger learns both paces.
    Every answer equals compute-only."""
    settings = stack_settings(nats_url, tmp_path, telemetry_s=0.2)
    tokens = prompt(700, seed=47)  # 10 usable chunks
    near, far = LocalStore(tmp_path / "near"), MemoryStore()
    got: list[LoaderTelemetry] = []

    async def collect(message: Message, _: str) -> None:
        if isinstance(message, LoaderTelemetry):
            got.append(message)

    async with TieredStore(near, far) as store, backend(settings, store) as be:
        merger, compute = be.services["merger"], be.services["compute"]
        assert isinstance(merger, Merger) and isinstance(compute, Compute)
        await be.client.handle(subjects.TELEMETRY_ALL, collect)
        space = Space.of(KeySpace(compute.runner.fingerprint, compute.runner.layout, 64))
        keys = PromptChunks.of(space.key_space(), tokens).keys

        async def lookup() -> LookupReply:
            ask = LookupRequest("r-tiers", space, pack_tokens(tokens))
            return await be.client.request(subjects.LOOKUP, ask, LookupReply, 2.0)

        reference = await be.generate(tokens, kv_mode="compute", salt="reference")
        await be.generate(tokens, kv_mode="compute")  # written back to both tiers
        assert (await lookup()).near_chunks == tuple(range(10))
        for key in keys:  # as if another node had stored them
            await near.delete(key)
        reply = await lookup()
        assert (reply.stored_chunks, reply.near_chunks) == (10, ())
        loaded = await be.generate(tokens, kv_mode="load")
        assert loaded.tokens == reference.tokens and loaded.done.chunks_loaded == 10

        async def copied_near() -> bool:
            return (await lookup()).near_chunks == tuple(range(10))

        await eventually(copied_near, "the verified chunks copied to the near tier")
        again = await be.generate(tokens, kv_mode="load")
        assert again.tokens == reference.tokens
        await eventually(
            lambda: sum(m.reads for m in got) >= 20
            and merger.estimator.near_load_s.value is not None,
            "the windows of both requests' reads, heard by the merger",
        )  # fmt: skip
        await asyncio.sleep(0.3)  # (a window with a read too many would go out by now)
    assert sum(m.reads - m.near_reads for m in got) == 10  # the far reads, then
    assert sum(m.near_reads for m in got) == 10  # the near ones
    assert all(m.far_busy_s is not None for m in got)
    assert sum(m.near_busy_s for m in got) > 0
    assert merger.estimator.load_s.value is not None
    assert merger.estimator.near_load_s.value is not None
    loader = be.services["loader"]
    assert isinstance(loader, Loader)
    tier_reads = {
        t: value(loader.metrics.registry, "cake_tier_reads_total", tier=t) for t in ("near", "far")
    }
    assert tier_reads == {"near": 10, "far": 10}


async def test_each_node_has_its_own_estimate_from_its_own_telemetry(local: Backend) -> None:
    """Two nodes, one with a link 8x slower: a request placed on each is advised from that node's
    pace; before a node has told both sides' pace, or with no node chosen, the deployment's."""
    merger = local.services["merger"]
    assert isinstance(merger, Merger)

    def loads(node: str, busy_s: float) -> LoaderTelemetry:
        return LoaderTelemetry(node, 1.0, 4, 4 << 20, busy_s / 4, busy_s, 0, 4, 0, 0)

    def computes(node: str) -> ComputeTelemetry:
        return ComputeTelemetry(node, 1.0, 2, 0.1, {"head": 256}, 4, 0.2, 0, 0, 0, 1 << 30)

    await merger.on_telemetry(loads("fast", 0.04), "")
    assert merger.estimator_for("fast") is merger.estimator  # compute's pace not heard yet
    for node, busy_s in (("fast", 0.04), ("slow", 0.32)):
        await merger.on_telemetry(computes(node), "")
        await merger.on_telemetry(loads(node, busy_s), "")
    fast, slow = merger.estimator_for("fast"), merger.estimator_for("slow")
    assert fast is merger.node_estimators["fast"] and slow is merger.node_estimators["slow"]
    assert fast.load_s.value is not None and slow.load_s.value is not None
    assert slow.load_s.value > 4 * fast.load_s.value
    assert merger.estimator_for(None) is merger.estimator
    assert merger.estimator_for("unheard-of") is merger.estimator


def test_the_head_cost_in_telemetry_is_that_of_planned_steps() -> None:
    """One-chunk pieces near a meeting point cost more per token; a window reports them only
    when no multi-chunk piece ran (what the estimator's hint is about)."""
    window = StepWindow()
    window.head(1, 0.2)
    alone = window.message("n", 0, 0, 0, 1)
    assert (alone.head_chunks, alone.head_s) == (1, 0.2)
    window.head(4, 0.4)
    window.head(1, 0.3)
    sent = window.message("n", 1, 2, 3, 4)
    assert (sent.head_chunks, sent.head_s) == (4, 0.4)
    assert (sent.running, sent.waiting, sent.kv_pool_bytes, sent.kv_budget_bytes) == (1, 2, 3, 4)


async def test_a_target_itl_cuts_prompt_pieces_while_others_decode(
    nats_url: str, tmp_path: Path
) -> None:
    """CAKE_TARGET_ITL_MS: decode steps over the target shrink the step budget to one chunk,
    so a long prompt that arrives while another request decodes goes in small pieces (and its
    answer is still exact); the budget is back in full when nobody decodes."""
    settings = stack_settings(nats_url, tmp_path, target_itl_ms=1.0, token_budget=512)
    long, short = prompt(900, seed=47), prompt(100, seed=48)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        compute = be.services["compute"]
        assert isinstance(compute, Compute) and compute.step_budget is not None
        reference = await be.generate(long, kv_mode="compute", max_tokens=2)
        decoding = asyncio.create_task(be.generate(short, kv_mode="compute", max_tokens=150))
        await asyncio.sleep(0.3)
        got = await be.generate(long, kv_mode="compute", max_tokens=2)
        assert not decoding.done()  # a chunk a step beside the decodes: the prompt did not wait
        await decoding
        assert compute.step_budget.tokens == 64  # every decode step took over 1 ms
        assert compute.step_budget.for_step(decoding=False) == 512
    assert got.tokens == reference.tokens


async def test_every_service_answers_discovery_with_its_node(local: Backend) -> None:
    """`nats micro ls` finds the merger, compute and loader (nats.micro's $SRV.PING)."""
    import json

    import nats

    client = await nats.connect(local.settings.nats_url)
    answers: list[dict[str, object]] = []

    async def on_answer(msg: object) -> None:
        answers.append(json.loads(msg.data))  # type: ignore[attr-defined]

    inbox = client.new_inbox()
    await client.subscribe(inbox, cb=on_answer)
    await client.publish("$SRV.INFO", b"", reply=inbox)
    await asyncio.sleep(0.5)
    await client.close()
    mine = {a["name"] for a in answers if a["metadata"] == {"node": local.settings.node}}
    assert mine == {"cake-merger", "cake-compute", "cake-loader"}
