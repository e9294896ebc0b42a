"""The loader: owns storage. Lookups, tail-first fetches into staging, write-back."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
from prometheus_client import CollectorRegistry

from services.loader.gate import ReadGate
from services.loader.link_probe import LinkPace, LinkProbe
from services.loader.metrics import LoaderMetrics
from services.loader.telemetry import ReadWindow
from shared.core.errors import BadRequestError, ConfigError, CorruptChunkError, StoreError
from shared.core.fetch_limit import FetchLimit
from shared.core.keys import PromptChunks, unpack_tokens
from shared.core.plan import MeetTracker
from shared.kv.format import verify_chunk
from shared.kv.stored import read_verified, store_missing
from shared.runtime.config import Settings
from shared.runtime.observability import tracer
from shared.runtime.service import Service
from shared.storage import LocalStore, is_s3, open_store
from shared.storage.base import NEAR, ChunkStore, leading, new_buffer
from shared.storage.staging import Incoming, Staging
from shared.storage.tiered import TieredStore
from shared.wire import subjects
from shared.wire.bus import Bus, RawInbox
from shared.wire.messages import (
    Accepted,
    Cancel,
    ChunkComputed,
    ChunkLoaded,
    FetchJob,
    HeadComputing,
    LoaderTelemetry,
    LoadFailed,
    LookupReply,
    LookupRequest,
    Meet,
    Message,
    Space,
    StoreJob,
)  # fmt: skip

log = structlog.get_logger(__name__)
FETCH_LIMIT_GROWTH = 4  # the node's read limit grows up to this times CAKE_FETCH_CONCURRENCY
PROBE_BYTES = 4 << 20  # the start-up probe object (a chunk's size, give or take)
LOOKUPS_AT_ONCE = 16  # lookups answered at once (each checks its chunks concurrently)
FETCH_JOBS_AT_ONCE = 8  # fetch jobs taken at once (their reads share the node's gate)
STORE_JOBS_AT_ONCE = 4  # write-backs at once: a slow one does not hold up the next
STAGING_SWEEP_EVERY_S = 30.0  # how often staged files of dead or cut-off requests are removed


def prompt_of(space: Space, tokens: bytes) -> PromptChunks:
    """The keyed prompt a message describes."""
    return PromptChunks.of(space.key_space(), unpack_tokens(tokens))


@dataclass
class Fetch:
    """One request's fetch in progress."""

    job: FetchJob
    prompt: PromptChunks
    staged: dict[int, str] = field(default_factory=dict)
    workers: list[asyncio.Task[None]] = field(default_factory=list)
    meet: int | None = None
    decided: asyncio.Event = field(default_factory=asyncio.Event)  # set with meet
    listening: list[RawInbox] = field(default_factory=list)  # its control, cancel and events
    frontiers: MeetTracker = field(init=False)  # its loads, and the head's steps and chunks

    def __post_init__(self) -> None:
        self.frontiers = MeetTracker(self.job.hit)

    def wants(self, index: int) -> bool:
        """Whether chunk `index` is still worth reading: not below the meeting point, nor
        computed, in a head step under way or below a chunk that failed to load."""
        tracker = self.frontiers  # (below a failed load the head computes anyway)
        head = max(tracker.announced, tracker.computed, tracker.floor)
        return index >= max(head, self.meet or 0)

    def decide(self, meet: int) -> None:
        """The meeting point is known: stop reading below it (and let finish_fetch clean up)."""
        self.meet = meet
        self.decided.set()

    def meet_if_reached(self) -> None:
        """Once the head's computed chunks have reached where every chunk after them is
        staged, the meeting point is there, by the merger's own rule (MeetTracker.meet, fed
        the same events): take it without waiting for the Meet, which NATS may lose."""
        split = self.frontiers.meet() if self.meet is None else None
        if split is not None:
            self.decide(split.meet)


class Loader(Service):
    """Serves lookups, fetches hit chunks newest first, writes staged chunks back."""

    name = "loader"

    def __init__(self, bus: Bus, store: ChunkStore, staging: Staging, settings: Settings) -> None:
        super().__init__(bus, settings)
        self.store, self.staging = store, staging
        self.fetches: dict[str, Fetch] = {}
        self.metrics = LoaderMetrics(staging.usage_bytes, store.usage_bytes)
        self.secret = settings.kv_secret_bytes()  # chunks must carry its MAC (None: no MAC)
        self.read_MBps = 0.0  # the store's read rate, measured by build()
        self.near_read_MBps = 0.0  # the near tier's (CAKE_STORE_CACHE), when there is one
        self.store_problem = ""  # why the last write-back failed, until one succeeds
        start = settings.fetch_concurrency  # reads at once on this node, all requests together
        most, least = (FETCH_LIMIT_GROWTH * start, 1) if settings.controllers else (start, start)
        self.fetch_limit = FetchLimit(float(start), max_limit=most, min_limit=least)
        self.gate = ReadGate(self.fetch_limit)
        self.metrics.watch_reads(self.gate)
        self.window = ReadWindow()
        self.link_probe: LinkProbe | None = None  # build() installs one (CAKE_LINK_PROBE_S)
        self.link_pace = LinkPace()  # the last chunk reads' pace, anchored to a probe reading

    async def start(self) -> None:
        """Subscribe to lookups and this node's fetch and store jobs."""
        node, queue = self.settings.node, subjects.QUEUE_LOADER
        for subject in (subjects.LOOKUP, subjects.lookup(node)):  # any node's, or this one's
            await self.bus.handle(subject, self.on_lookup, queue, concurrency=LOOKUPS_AT_ONCE)
        await self.bus.handle(subjects.LOADER_INFO, self.on_info, queue=queue)
        await self.bus.handle(subjects.fetch(node), self.on_fetch, queue, FETCH_JOBS_AT_ONCE)
        await self.bus.handle(subjects.store(node), self.on_store, queue, STORE_JOBS_AT_ONCE)
        self.loops.spawn(self.sweep_staging())
        self.loops.spawn(self.publish_telemetry(self.telemetry))
        if self.link_probe is not None:
            self.loops.spawn(self.probe_link(self.link_probe))

    async def probe_link(self, probe: LinkProbe) -> None:
        """Once no chunk has been read for CAKE_LINK_PROBE_S, probe the link that often, and
        send at once what each reading says a chunk takes now (see LinkPace): a link that
        changed while nobody loaded is then known to the mergers before the next request."""
        every, failing = self.settings.link_probe_s, False
        while True:
            await asyncio.sleep(every)
            if self.gate.idle_s() < every:
                continue
            admitted = self.gate.admitted
            timeout = self.settings.fetch_timeout_s  # (a read that hangs is cut off, as a chunk's)
            try:
                async with asyncio.timeout(timeout):  # (not wait_for: see Compute.loop)
                    rate = await probe.timed_read_MBps()
            except Exception as exc:  # (a store or staging error, or the timeout: the loop goes on)
                if not failing:
                    log.warning("link probe failed", error=repr(exc))
                failing = True
                continue
            failing = False
            if rate is None or self.gate.admitted != admitted:  # a chunk read shared the link
                continue
            window = self.telemetry()  # (the reads it closes count before the reading)
            chunk_s = self.link_pace.probed(rate) or 0.0  # (0: the anchor, nothing to say yet)
            await self.send_telemetry(msgspec.structs.replace(window, probe_chunk_s=chunk_s))

    def telemetry(self) -> LoaderTelemetry:
        """The window of reads since the last call; a new one opens."""
        window, self.window = self.window, ReadWindow()
        tiers = self.store.take_reads() if isinstance(self.store, TieredStore) else None
        for tier, reads in (tiers or {}).items():
            self.metrics.tier_reads.labels(tier=tier).inc(reads.reads)
        message = window.message(self.settings.node, self.gate, tiers, self.store_problem)
        self.link_pace.saw(*message.far_pace())
        return message

    async def on_info(self, _: Message, __: str) -> Message:
        """Answer that a loader is up, on which node, and whether its store takes writes (the
        gateway's /health asks)."""
        return Accepted(node=self.settings.node, problem=self.store_problem)

    async def checked_prompt(self, space: Space, tokens: bytes) -> PromptChunks:
        """The keyed prompt a message describes, checked, not trusted for coming over NATS:
        chunks of this deployment's size (keys hashed off the event loop)."""
        if space.chunk_tokens != self.settings.chunk_tokens:
            raise BadRequestError(f"chunks here hold {self.settings.chunk_tokens} tokens")
        return await asyncio.to_thread(prompt_of, space, tokens)

    async def on_lookup(self, msg: Message, _: str) -> Message:
        """How many leading chunks of the prompt are stored."""
        assert isinstance(msg, LookupRequest)
        prompt = await self.checked_prompt(msg.space, msg.tokens)
        with tracer(__name__).start_as_current_span("loader.lookup"):
            tiers = await self.store.tiers(prompt.keys)
        stored = leading(tiers)
        near = tuple(i for i, tier in enumerate(tiers[:stored]) if tier == NEAR)
        self.metrics.lookups.inc()
        return LookupReply(stored, self.read_MBps, near, self.near_read_MBps)

    async def on_fetch(self, msg: Message, _: str) -> Message:
        """Start fetching chunks [0, hit) tail first with bounded concurrency."""
        assert isinstance(msg, FetchJob)
        prompt = await self.checked_prompt(msg.space, msg.tokens)
        if not 0 <= msg.hit <= len(prompt.keys):
            raise BadRequestError(f"hit {msg.hit} is not a number of the prompt's chunks")
        fetch = Fetch(msg, prompt)
        self.fetches[msg.request_id] = fetch
        rid = msg.request_id
        fetch.listening = [
            await self.bus.handle(subjects.control(rid), self.on_control),
            await self.bus.handle(subjects.cancel(rid), self.on_cancel),
            await self.bus.handle(subjects.events(rid), self.on_event),
        ]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for j in range(msg.hit - 1, -1, -1):
            queue.put_nowait(j)
        n = min(self.fetch_limit.max_limit, msg.hit)  # the node's gate bounds them all
        with structlog.contextvars.bound_contextvars(request_id=msg.request_id):  # for the tasks
            fetch.workers = [self.tasks.spawn(self.fetch_worker(fetch, queue)) for _ in range(n)]
            self.tasks.spawn(self.finish_fetch(fetch))
        return Accepted(node=self.settings.node)  # (Meet and Cancel come after it)

    async def fetch_worker(self, fetch: Fetch, queue: asyncio.Queue[int]) -> None:
        """Load chunks from the queue until it is empty, the fetch is stopped or its deadline
        passes, each in a slot of the node's gate. The chunk is taken from the queue once the
        slot is held, so chunks are read tail first whatever order the gate admits workers in."""
        while not queue.empty():
            try:
                async with asyncio.timeout(max(0.0, fetch.job.deadline - time.time())):
                    await self.gate.acquire()  # (in this task: a timeout cannot lose a slot)
            except TimeoutError:
                return
            try:
                if queue.empty():
                    return
                index = queue.get_nowait()
                if not fetch.wants(index):
                    return
                await self.fetch_one(fetch, index)
            finally:
                await self.gate.release()

    async def fetch_one(self, fetch: Fetch, index: int) -> None:
        """Read one chunk straight into its staged file, verify it, stage it; report loaded or
        failed."""
        rid = fetch.job.request_id
        events = subjects.events(rid)
        start = time.perf_counter()
        remaining = fetch.job.deadline - time.time()
        timeout = max(0.0, min(self.settings.fetch_timeout_s, remaining))
        incoming: Incoming | None = None
        with tracer(__name__).start_as_current_span(
            "loader.chunk", attributes={"chunk": index, "cake.fetch_limit": self.fetch_limit.slots}
        ):
            try:
                incoming = self.staging.incoming(rid, f"{index}.kv")
                nbytes = await self.read_chunk(fetch, index, incoming, timeout)
                path = await asyncio.to_thread(incoming.commit)  # (munmap: not on the loop)
            except asyncio.CancelledError:  # the request was cancelled
                if incoming is not None:
                    incoming.discard()
                raise
            except Exception as exc:  # any failure is this chunk's alone: compute takes it
                if incoming is not None:
                    incoming.discard()
                if not isinstance(exc, StoreError | CorruptChunkError | TimeoutError | OSError):
                    log.exception("chunk load failed unexpectedly", chunk=index)
                reason = "corrupt" if isinstance(exc, CorruptChunkError) else str(exc) or "timeout"
                self.metrics.load_failures.inc()
                fetch.frontiers.on_failed(index)
                if isinstance(exc, CorruptChunkError):
                    self.metrics.corrupt_chunks.inc()
                await self.bus.publish(events, LoadFailed(rid, index, reason[:200]))
                return
        fetch.staged[index] = path
        fetch.frontiers.on_loaded(index)
        fetch.meet_if_reached()
        duration = time.perf_counter() - start
        self.metrics.bytes_loaded.inc(nbytes)
        self.metrics.chunks_loaded.inc()
        self.metrics.fetch_seconds.observe(duration)
        await self.bus.publish(events, ChunkLoaded(rid, index, nbytes, duration, path))

    async def read_chunk(self, fetch: Fetch, index: int, incoming: Incoming, timeout: float) -> int:
        """Read and verify one chunk into its staged file; its bytes. The read's time feeds the
        node's fetch limit."""
        try:
            started = time.perf_counter()
            async with asyncio.timeout(timeout):  # (not wait_for: see Compute.loop)
                data = await read_verified(
                    self.store, fetch.prompt, index, incoming.allocate, self.secret
                )
            if data is None:
                raise StoreError("missing (evicted since the lookup)")
            self.fetch_limit.on_read(time.perf_counter() - started, len(data))
            self.window.read(time.perf_counter() - started, len(data))
            nbytes = len(data)
            data.release()
            return nbytes
        except CorruptChunkError:  # the chunk's fault, not the link's: the limit stays
            self.window.failed(stalled=False)
            raise
        except (StoreError, TimeoutError, OSError) as exc:
            self.fetch_limit.on_failure()
            self.window.failed(stalled=isinstance(exc, TimeoutError))
            raise

    async def finish_fetch(self, fetch: Fetch) -> None:
        """When every worker ended (done or stopped), drop staged chunks compute will not use."""
        remaining = max(0.0, fetch.job.deadline - time.time())
        _, pending = await asyncio.wait(fetch.workers, timeout=remaining)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):  # the meeting point decides what is used
            await asyncio.wait_for(fetch.decided.wait(), max(0.0, fetch.job.deadline - time.time()))
        self.fetches.pop(fetch.job.request_id, None)
        await self.bus.unhandle(*fetch.listening)
        keep_from = fetch.meet if fetch.meet is not None else fetch.job.hit
        for index, path in fetch.staged.items():
            if index < keep_from:
                self.staging.discard(path)

    async def on_control(self, msg: Message, subject: str) -> None:
        """Meet: stop fetching below the meeting point."""
        fetch = self.fetches.get(subjects.request_id_of(subject))
        if fetch is not None and isinstance(msg, Meet):
            fetch.decide(msg.meet)

    async def on_event(self, msg: Message, subject: str) -> None:
        """HeadComputing, ChunkComputed: stop short of the chunks the head is computing or
        computed; a computed head that reached the staged chunks is the meeting point (the
        request's other events, this loader's own included, say nothing to it)."""
        fetch = self.fetches.get(subjects.request_id_of(subject))
        if fetch is not None and isinstance(msg, HeadComputing):
            fetch.frontiers.on_head_step(msg.upto)
        elif fetch is not None and isinstance(msg, ChunkComputed):
            fetch.frontiers.on_computed(msg.upto)
            fetch.meet_if_reached()

    async def on_cancel(self, msg: Message, subject: str) -> None:
        """Cancel: stop and drop everything."""
        fetch = self.fetches.get(subjects.request_id_of(subject))
        if fetch is not None and isinstance(msg, Cancel):
            fetch.decide(fetch.job.hit)
            for task in fetch.workers:
                task.cancel()

    async def on_store(self, msg: Message, _: str) -> Message:
        """Write staged chunk files to storage (skipping ones already there), then remove them."""
        assert isinstance(msg, StoreJob)
        prompt = await self.checked_prompt(msg.space, msg.tokens)
        for index, path in msg.staged.items():  # refuse the whole job before touching a file
            self.staging.owned(path, msg.request_id)
            if not 0 <= index < len(prompt.keys):
                raise ValueError(f"chunk {index} is not a complete chunk of this prompt")

        async def read_staged(index: int) -> bytes:
            data = await asyncio.to_thread(self.staging.read, msg.staged[index])
            await asyncio.to_thread(verify_chunk, data, prompt.identity(index), self.secret)
            return bytes(data)

        with tracer(__name__).start_as_current_span(
            "loader.store", attributes={"chunks": len(msg.staged)}
        ):
            try:
                chunks, nbytes = await store_missing(
                    self.store, prompt, sorted(msg.staged), read_staged
                )
                self.metrics.chunks_stored.inc(chunks)
                self.metrics.bytes_stored.inc(nbytes)
                self.store_problem = ""
            except (StoreError, CorruptChunkError, OSError) as exc:
                self.metrics.store_failures.inc()
                log.warning("write-back failed", request_id=msg.request_id, error=str(exc))
                if not isinstance(exc, CorruptChunkError):  # (the chunk's fault, not the store's)
                    self.store_problem = f"the store refuses writes: {exc}"[:300]
            finally:
                for path in msg.staged.values():
                    self.staging.discard(path)
        self.staging.discard_request_if_empty(msg.request_id)
        return Accepted(node=self.settings.node)

    async def sweep_staging(self) -> None:
        """Every STAGING_SWEEP_EVERY_S, remove staged files of requests whose services died or
        were cut off (untouched for twice the request timeout)."""
        while True:
            await asyncio.sleep(STAGING_SWEEP_EVERY_S)
            try:
                await asyncio.to_thread(self.staging.sweep, 2 * self.settings.request_timeout_s)
            except OSError as exc:
                log.warning("staging sweep failed", error=str(exc))

    def registry(self) -> CollectorRegistry:
        """This service's metric families."""
        return self.metrics.registry

    def describe(self) -> dict[str, Any]:
        """Store and node, for the ready log line."""
        return {"store": self.settings.store, "node": self.settings.node}


def store_from_settings(settings: Settings) -> ChunkStore:
    """The chunk store the settings name, behind its near tier when CAKE_STORE_CACHE is set."""
    store = open_store(
        settings.store,
        capacity_bytes=settings.store_capacity_bytes,
        bandwidth=settings.bandwidth_trace(),
        endpoint_url=settings.s3_endpoint,
        region=settings.s3_region,
        part_bytes=round(settings.s3_part_mb * 2**20) if is_s3(settings.store) else None,
    )
    if not settings.store_cache:
        return store
    return TieredStore(LocalStore(settings.store_cache, settings.store_cache_bytes()), store)


async def build(bus: Bus, settings: Settings, resources: AsyncExitStack) -> Loader:
    """A loader over the store the settings name (opened now, closed with the service)."""
    staging = Staging(settings.staging_dir)
    staging.sweep(older_than_s=settings.request_timeout_s * 2)
    store = await resources.enter_async_context(store_from_settings(settings))
    loader = Loader(bus, store, staging, settings)
    link = store.far if isinstance(store, TieredStore) else store  # the near tier is no link
    loader.read_MBps = await probe_store(link, settings)
    if isinstance(store, TieredStore):
        loader.near_read_MBps = await probe_store(store.near, settings, settings.store_cache)
    log.info("probed the store", read_MBps=round(loader.read_MBps, 1),
             near_read_MBps=round(loader.near_read_MBps, 1))  # fmt: skip
    if settings.link_probe_s > 0:
        probe = LinkProbe(link, staging, settings.node)
        await probe.install()
        resources.push_async_callback(remove_or_warn, probe)
        loader.link_probe = probe
    return loader


async def remove_or_warn(probe: LinkProbe) -> None:
    """Delete the link probe's object at shutdown (a store that refuses leaves it behind)."""
    try:
        await probe.remove()
    except StoreError as exc:
        log.warning("link probe object not removed", key=probe.key, error=str(exc))


async def probe_store(store: ChunkStore, settings: Settings, where: str | None = None) -> float:
    """Write, read back and delete a probe object: the store's read rate in MB/s, the merger's
    first load estimate. A store that cannot take a write stops the loader here, with what to
    fix, rather than at every write-back later."""
    key = hashlib.sha256(f"cake-probe:{settings.node}:{uuid.uuid4()}".encode()).hexdigest()
    data = os.urandom(PROBE_BYTES)
    try:
        await store.put(key, data)
        started = time.perf_counter()
        read = await store.get_into(key, new_buffer)
        seconds = time.perf_counter() - started
        await store.delete(key)
    except StoreError as exc:
        raise ConfigError(
            f"the loader cannot write to and read from its store {where or settings.store} "
            f"({exc}); "
            "check that the directory is writable or the bucket exists and the credentials "
            "allow PutObject, GetObject and DeleteObject"
        ) from exc
    if read is None or bytes(read) != data:
        raise ConfigError(
            f"the store {where or settings.store} did not return what was written to it"
        )
    return PROBE_BYTES / seconds / 1e6
