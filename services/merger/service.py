"""The merger: coordinates each request and decides where compute and loads meet."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import nats
import structlog
from nats.aio.msg import Msg

from services.merger.metrics import MergerMetrics
from shared.core.estimator import Advice, SplitEstimator
from shared.core.plan import MeetTracker, Split, usable_hit_chunks
from shared.runtime.config import Settings
from shared.runtime.metrics import serve_metrics
from shared.runtime.observability import configure_logging, configure_tracing, tracer
from shared.wire import subjects
from shared.wire.bus import Bus, RemoteError, Unavailable, spawn
from shared.wire.messages import (
    Accepted,
    Cancel,
    ChunkComputed,
    ChunkLoaded,
    Failed,
    FetchJob,
    GenerateRequest,
    LoadFailed,
    LookupReply,
    LookupRequest,
    Meet,
    Message,
    ModelInfo,
    PrefillJob,
)  # fmt: skip

log = structlog.get_logger(__name__)


class Merger:
    """Per request: lookup, dispatch compute and fetch, watch both frontiers, call the meet."""

    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus, self.settings = bus, settings
        self.info: ModelInfo | None = None
        self.estimator = SplitEstimator(skip_head_ratio=settings.skip_head_ratio)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.metrics = MergerMetrics()

    async def start(self) -> None:
        """Take generate requests (queue group: any merger replica may coordinate one)."""
        await self.bus.handle(subjects.GENERATE, self.on_generate, queue=subjects.QUEUE_MERGER)

    async def on_generate(self, msg: Message, _: Msg) -> Message:
        """Accept at once; coordinate in the background."""
        assert isinstance(msg, GenerateRequest)
        spawn(self.coordinate(msg), self.tasks)
        return Accepted()

    async def model_info(self) -> ModelInfo:
        """What the compute service serves (asked once, then remembered)."""
        if self.info is None:
            self.info = await self.bus.request(
                subjects.COMPUTE_INFO, Accepted(), ModelInfo, self.settings.rpc_timeout_s
            )
        return self.info

    async def lookup(self, req: GenerateRequest, space: dict[str, Any]) -> int:
        """Stored leading chunks; 0 when the loader cannot answer (the request computes)."""
        if req.kv_mode == "compute":
            return 0
        try:
            reply = await self.bus.request(
                subjects.LOOKUP, LookupRequest(req.request_id, space, req.tokens), LookupReply,
                self.settings.rpc_timeout_s,
            )  # fmt: skip
        except (Unavailable, RemoteError) as exc:
            log.warning("lookup failed; computing everything", error=str(exc))
            return 0
        return reply.stored_chunks

    async def fail(self, req: GenerateRequest, status: int, code: str, message: str) -> None:
        """Tell the gateway the request failed, and compute and loader to drop it."""
        log.warning("request failed", code=code, message=message)
        self.metrics.finished(req.kv_mode, "failed")
        rid = req.request_id
        with contextlib.suppress(nats.errors.Error):
            await self.bus.publish(subjects.control(rid), Cancel(rid, message))
            await self.bus.publish(subjects.stream(rid), Failed(rid, status, code, message))

    async def coordinate(self, req: GenerateRequest) -> None:
        """The whole life of one request on the merger's side."""
        with (
            structlog.contextvars.bound_contextvars(request_id=req.request_id),
            tracer(__name__).start_as_current_span("merger.request") as span,
        ):
            try:
                await self._coordinate(req, span)
            except Unavailable as exc:
                await self.fail(req, 503, "unavailable", f"compute service unavailable: {exc}")
            except RemoteError as exc:
                if exc.code == "bad_request":
                    self.info = None  # compute may serve another model now: ask again
                status = 400 if exc.code == "bad_request" else 500
                await self.fail(req, status, exc.code, exc.description)
            except Exception as exc:  # never leave a request without an answer
                log.exception("coordination failed")
                await self.fail(req, 500, "internal", f"the merger failed: {exc}"[:500])
            except asyncio.CancelledError:  # the merger is shutting down
                await self.fail(req, 503, "unavailable", "the merger shut down; try again")
                raise

    async def _coordinate(self, req: GenerateRequest, span: Any) -> None:
        info = await self.model_info()
        space = {**info.space, "salt": req.salt}
        n_tokens = len(req.tokens) // 4
        with tracer(__name__).start_as_current_span("merger.lookup"):
            stored = await self.lookup(req, space)
        hit = usable_hit_chunks(stored, n_tokens, int(space["chunk_tokens"]))
        span.set_attribute("cake.hit_chunks", hit)
        events = await self.bus.nc.subscribe(subjects.events(req.request_id))
        try:
            advice = self.estimator.advise(hit) if req.kv_mode == "cake" else Advice()
            if hit and req.kv_mode == "cake":
                self.metrics.advised(advice)
            compute_head = req.kv_mode != "load" and advice.compute_head
            span.set_attribute("cake.head_hint", advice.head_hint)
            job = PrefillJob(
                req.request_id, req.tokens, space, hit, compute_head, req.sampling,
                req.deadline, advice.head_hint,
            )  # fmt: skip
            accepted = await self.bus.request(
                subjects.COMPUTE_PREFILL, job, Accepted, self.settings.rpc_timeout_s
            )
            staged: dict[int, str] = {}
            if hit and not advice.fetch:
                split, outcome = Split(hit, hit), "no_fetch"  # too short to split: compute all
            elif hit and not await self.dispatch_fetch(req, space, hit, accepted.node):
                split, outcome = Split(hit, hit), "no_loader"  # compute takes it all
            elif hit:
                split, staged, outcome = await self.watch(req, hit, compute_head, events)
            else:
                split, outcome = Split(0, 0), "no_hit"
        finally:
            await events.unsubscribe()
        span.set_attribute("cake.meet_chunk", split.meet)
        meet = Meet(req.request_id, split.meet, hit, {j: staged[j] for j in split.loaded})
        await self.bus.publish(subjects.control(req.request_id), meet)
        self.metrics.finished(req.kv_mode, outcome, split.meet, hit)

    async def dispatch_fetch(
        self, req: GenerateRequest, space: dict[str, Any], hit: int, node: str
    ) -> bool:
        """Hand the fetch to the loader beside the compute replica; False if none answers."""
        fetch = FetchJob(req.request_id, req.tokens, space, hit, req.deadline)
        try:
            await self.bus.request(
                subjects.fetch(node), fetch, Accepted, self.settings.rpc_timeout_s
            )
        except (Unavailable, RemoteError) as exc:
            log.warning("no loader on the compute node; computing everything", error=str(exc))
            self.estimator.observe_loads(1, self.settings.fetch_timeout_s)  # a lost link is slow
            return False
        return True

    async def watch(
        self, req: GenerateRequest, hit: int, compute_head: bool, events: Any
    ) -> tuple[Split, dict[int, str], str]:
        """Follow computed/loaded events until the frontiers meet (or loads can no longer help);
        the split, the staged chunks and how it ended (met, or stalled).

        Feeds the estimator: seconds per computed chunk, and the link's seconds per chunk
        (the spacing of chunk arrivals).
        """
        tracker = MeetTracker(hit, compute_head=compute_head)
        staged: dict[int, str] = {}
        start = time.monotonic()
        arrivals: list[float] = []
        split, outcome = tracker.meet(), "met"
        while split is None:
            timeout = min(self.settings.fetch_timeout_s, req.deadline - time.time())
            try:
                raw = await events.next_msg(timeout=max(0.001, timeout))
            except TimeoutError:
                log.warning("no progress; compute takes the rest", frontier=tracker.load_frontier)
                self.estimator.observe_loads(1, self.settings.fetch_timeout_s)  # a stalled link
                split, outcome = Split(tracker.load_frontier, hit), "stalled"
                break
            event = Message.decode(raw.data)
            if isinstance(event, ChunkComputed):
                self.estimator.observe_compute(event.upto - tracker.computed, event.duration_s)
                tracker.on_computed(event.upto)
            elif isinstance(event, ChunkLoaded):
                arrivals.append(time.monotonic())
                staged[event.index] = event.staged
                tracker.on_loaded(event.index)
            elif isinstance(event, LoadFailed):
                log.warning("chunk load failed", chunk=event.index, reason=event.reason)
                tracker.on_failed(event.index)
                if event.reason == "timeout":  # a stalled read says the link is slow
                    self.estimator.observe_loads(1, self.settings.fetch_timeout_s)
            split = tracker.meet()
        self.observe_link(start, arrivals)
        return split, staged, outcome

    def observe_link(self, start: float, arrivals: list[float]) -> None:
        """Feed the estimator the link's pace: the spacing of arrivals after the first batch of
        concurrent reads (their common latency is not bandwidth), else the average since the
        fetch was sent."""
        first = self.settings.fetch_concurrency
        if len(arrivals) > first:
            paced = len(arrivals) - first
            self.estimator.observe_loads(paced, arrivals[-1] - arrivals[first - 1])
        elif arrivals:
            self.estimator.observe_loads(len(arrivals), arrivals[-1] - start)

    async def close(self) -> None:
        """Let requests being coordinated finish (bounded), then stop."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=self.settings.rpc_timeout_s)
        for task in self.tasks:
            task.cancel()


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Run the merger until stop is set."""
    configure_logging("merger", settings.log_format, settings.log_level)
    configure_tracing("merger")
    bus = await Bus.connect(settings.nats_url, "cake-merger")
    merger = Merger(bus, settings)
    try:
        await merger.start()
        log.info("merger ready")
        async with serve_metrics(merger.metrics.registry, settings.host, settings.metrics_port):
            await stop.wait()
    finally:
        await merger.close()  # requests in flight still need the bus
        await bus.close()
