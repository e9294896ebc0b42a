"""The merger: coordinates each request and decides where compute and loads meet."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from contextlib import AsyncExitStack
from typing import Any

import structlog
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from services.merger.metrics import MergerMetrics
from shared.core.errors import (
    ErrorCode,
    NoResponders,
    RemoteError,
    RequestTimeout,
    TransportError,
    Unavailable,
)
from shared.core.estimator import Advice, SplitEstimator
from shared.core.keys import PromptChunks, unpack_tokens
from shared.core.placement import Placement
from shared.core.plan import (
    MeetTracker,
    Split,
    loads_overdue_after,
    loads_pace,
    loads_too_slow,
    pace_at_least,
    resume_hint,
    usable_hit_chunks,
)
from shared.core.request import KvMode
from shared.runtime.config import Settings
from shared.runtime.observability import tracer
from shared.runtime.service import Service
from shared.wire import subjects
from shared.wire.bus import Bus, Inbox, R
from shared.wire.messages import (
    Accepted,
    Cancel,
    ChunkComputed,
    ChunkLoaded,
    ComputeTelemetry,
    Failed,
    FetchJob,
    GenerateRequest,
    HeadComputing,
    LoaderTelemetry,
    LoadFailed,
    LookupReply,
    LookupRequest,
    Meet,
    Message,
    ModelInfo,
    PrefillJob,
    Space,
    StartHead,
)  # fmt: skip

log = structlog.get_logger(__name__)
CANCEL_CHECK_S = 0.5  # while it watches a request, the merger looks for its Cancel this often


def new_estimator(settings: Settings) -> SplitEstimator:
    """An estimate with nothing heard yet, advising by these settings."""
    return SplitEstimator(
        skip_head_ratio=settings.skip_head_ratio, split_cost_chunks=settings.split_cost_chunks
    )


class Merger(Service):
    """Per request: lookup, dispatch compute and fetch, watch both frontiers, call the meet."""

    name = "merger"

    def __init__(self, bus: Bus, settings: Settings) -> None:
        super().__init__(bus, settings)
        self.info: ModelInfo | None = None
        self.estimator = new_estimator(settings)  # every node
        self.node_estimators: dict[str, SplitEstimator] = {}  # each node's own
        self.placement = Placement(stale_after_s=settings.telemetry_stale_s)  # then not routed to
        self.metrics = MergerMetrics()

    async def start(self) -> None:
        """Take generate requests (queue group: any merger replica may coordinate one)."""
        await self.bus.handle(subjects.GENERATE, self.on_generate, queue=subjects.QUEUE_MERGER)
        await self.bus.handle(subjects.MERGER_INFO, self.on_info, queue=subjects.QUEUE_MERGER)
        await self.bus.handle(subjects.TELEMETRY_ALL, self.on_telemetry)  # every replica: all

    async def on_info(self, _: Message, __: str) -> Message:
        """Answer that a merger is up (the gateway's /health asks)."""
        return Accepted()

    async def on_telemetry(self, msg: Message, _: str) -> None:
        """Feed the estimator what each side really delivered, from the telemetry every merger
        replica receives alike: head chunks' cost with queueing, the link's pace while reading."""
        if isinstance(msg, ComputeTelemetry):
            for estimator in self.estimates(msg.node):
                estimator.observe_compute(msg.head_chunks, msg.head_s)
            self.placement.observe(msg.node, msg.running, msg.waiting, time.monotonic())
        elif isinstance(msg, LoaderTelemetry):
            for estimator in self.estimates(msg.node):
                estimator.observe_loads(*msg.far_pace())
                estimator.observe_near_loads(msg.near_reads, msg.near_busy_s)
                estimator.observe_loads(1, msg.probe_chunk_s)  # (0: no reading, nothing learnt)
            self.placement.observe_loader(msg.node, time.monotonic())

    def node_estimator(self, node: str) -> SplitEstimator:
        """The estimate of one node, from its own telemetry."""
        if node not in self.node_estimators:
            estimator = new_estimator(self.settings)
            self.node_estimators[node] = estimator
            if self.info is not None:
                self.seed_compute(estimator, self.info.chunk_compute_s)
        return self.node_estimators[node]

    def seed_compute(self, estimator: SplitEstimator, chunk_compute_s: float) -> None:
        """Seed an estimate with the chunk cost compute measured when its model loaded
        (unless every head step is one chunk, CAKE_EXACT_SPLITS: their cost is then the one
        that counts)."""
        if not self.settings.exact_splits:
            estimator.seed_compute(chunk_compute_s)

    def estimates(self, node: str) -> tuple[SplitEstimator, SplitEstimator]:
        """Every estimate that what happens on `node` informs: the deployment's and the
        node's own (telemetry and a request's outcome alike feed both)."""
        return self.estimator, self.node_estimator(node)

    def link_lost(self, node: str) -> None:
        """A fetch on `node` found no loader or stalled: its link counts as slow."""
        for estimator in self.estimates(node):
            estimator.link_stalled(self.settings.fetch_timeout_s)

    def estimator_for(self, node: str | None) -> SplitEstimator:
        """The estimate for a request placed on `node`: that node's own once its telemetry has
        told both sides' pace, the deployment's before that or when no node was chosen."""
        own = self.node_estimators.get(node) if node else None
        if own is not None and own.compute_s.value is not None and own.load_s.value is not None:
            return own
        return self.estimator

    async def on_generate(self, msg: Message, _: str) -> Message:
        """Accept at once (listening for the client's Cancel first); coordinate in the
        background."""
        assert isinstance(msg, GenerateRequest)
        control = await self.bus.subscribe(subjects.cancel(msg.request_id))
        self.tasks.spawn(self.coordinate(msg, control))
        return Accepted()

    async def model_info(self) -> ModelInfo:
        """What the compute service serves (asked once, then remembered); its chunk cost
        measured at start seeds every compute estimate."""
        if self.info is None:
            self.remember(
                await self.bus.request(
                    subjects.COMPUTE_INFO, Accepted(), ModelInfo, self.settings.rpc_timeout_s
                )
            )
        assert self.info is not None
        return self.info

    def remember(self, info: ModelInfo) -> None:
        """Keep what compute serves, and seed the estimates with its chunk cost."""
        self.info = info
        for estimator in (self.estimator, *self.node_estimators.values()):
            self.seed_compute(estimator, info.chunk_compute_s)

    async def routed(
        self, node: str | None, subject: str, any_node: str, message: Message, reply: type[R]
    ) -> R:
        """A request to the chosen node's `subject` (if one was chosen), or to any node's when
        that node has gone (it is then not chosen again until its telemetry returns)."""
        timeout = self.settings.rpc_timeout_s
        if node is not None:
            try:
                return await self.bus.request(subject, message, reply, timeout)
            except NoResponders:
                log.warning("the chosen node is gone; any node takes the request", node=node)
                self.placement.forget(node)
        return await self.bus.request(any_node, message, reply, timeout)

    async def place(self, req: GenerateRequest, space: Space) -> tuple[str | None, list[str]]:
        """The node for this request (None: any) and the chunk keys its memory tier will hold
        (only Cake requests use the tier; only with several nodes is there a choice)."""
        now = time.monotonic()
        if len(self.placement.alive(now)) < 2:
            return None, []
        keys: list[str] = []
        if req.kv_mode == KvMode.CAKE:
            prompt = await asyncio.to_thread(
                PromptChunks.of, space.key_space(), unpack_tokens(req.tokens)
            )
            keys = list(prompt.keys)
        return self.placement.choose(keys, now), keys

    async def lookup(
        self, req: GenerateRequest, space: Space, node: str | None
    ) -> tuple[int, tuple[int, ...]]:
        """Stored leading chunks, as the loader of the chosen node sees them, and which of
        them its near tier holds; 0 when no loader can answer (the request computes)."""
        if req.kv_mode == KvMode.COMPUTE:
            return 0, ()
        subject = subjects.lookup(node) if node else subjects.LOOKUP
        try:
            reply = await self.routed(
                node, subject, subjects.LOOKUP, LookupRequest(req.request_id, space, req.tokens),
                LookupReply,
            )  # fmt: skip
        except (Unavailable, RemoteError) as exc:
            log.warning("lookup failed; computing everything", error=str(exc))
            return 0, ()
        for pace, probed in ((self.estimator.load_s, reply.read_MBps),
                             (self.estimator.near_load_s, reply.near_read_MBps)):  # fmt: skip
            if pace.value is None and probed > 0:  # the first estimate
                pace.add(space.chunk_bytes() / (probed * 1e6))
        return reply.stored_chunks, reply.near_chunks

    async def fail(
        self, req: GenerateRequest, code: ErrorCode, message: str, retry_after_s: float = 0.0
    ) -> None:
        """Tell the gateway the request failed, and compute and loader to drop it."""
        log.warning("request failed", code=code, message=message)
        self.metrics.finished(req.kv_mode, "failed")
        rid = req.request_id
        failed = Failed(rid, code, message, retry_after_s)
        with contextlib.suppress(TransportError):
            await self.bus.publish(subjects.cancel(rid), Cancel(rid, message))
            await self.bus.publish(subjects.stream(rid), failed)

    async def coordinate(self, req: GenerateRequest, control: Inbox) -> None:
        """The whole life of one request on the merger's side."""
        async with control:
            await self._coordinate_or_fail(req, control)

    async def cancelled_meanwhile(self, req: GenerateRequest, control: Inbox) -> bool:
        """Whether the client cancelled while the request was being handed out. Its Cancel may
        have reached compute or the loader before they listened for it, so it is sent again,
        now that they do; the merger then stops coordinating (and learns nothing from it)."""
        while True:
            try:
                message = (await control.next(0.0)).message
            except RequestTimeout:
                return False
            if isinstance(message, Cancel):
                await self.bus.publish(subjects.cancel(req.request_id), message)
                return True

    async def _coordinate_or_fail(self, req: GenerateRequest, control: Inbox) -> None:
        with (
            structlog.contextvars.bound_contextvars(request_id=req.request_id),
            tracer(__name__).start_as_current_span("merger.request") as span,
        ):
            try:
                await self._coordinate(req, span, control)
            except Unavailable as exc:
                await self.fail(req, ErrorCode.UNAVAILABLE, f"compute service unavailable: {exc}")
            except RemoteError as exc:
                code = ErrorCode.of(exc.code)
                if code == ErrorCode.BAD_REQUEST:
                    self.info = None  # compute may serve another model now: ask again
                await self.fail(req, code, exc.description, exc.retry_after_s)
            except Exception as exc:  # never leave a request without an answer
                log.exception("coordination failed")
                await self.fail(req, ErrorCode.INTERNAL, f"the merger failed: {exc}"[:500])
            except asyncio.CancelledError:  # the merger is shutting down
                await self.fail(req, ErrorCode.UNAVAILABLE, "the merger shut down; try again")
                raise

    async def _coordinate(self, req: GenerateRequest, span: Any, control: Inbox) -> None:
        info = await self.model_info()
        space = info.space.salted(req.salt)
        n_tokens = len(req.tokens) // 4
        node, keys = await self.place(req, space)
        span.set_attribute("cake.routed_to", node or "any")
        with tracer(__name__).start_as_current_span("merger.lookup"):
            stored, near = await self.lookup(req, space, node)
        hit = usable_hit_chunks(stored, n_tokens, space.chunk_tokens)
        estimator = self.estimator_for(node)
        span.set_attribute("cake.hit_chunks", hit)
        async with await self.bus.subscribe(subjects.events(req.request_id)) as events:
            adapt = req.kv_mode == KvMode.CAKE and self.settings.controllers
            advice = estimator.advise(hit, frozenset(near)) if adapt else Advice()
            if hit and req.kv_mode == KvMode.CAKE:
                self.metrics.advised(advice)
            compute_head = req.kv_mode != KvMode.LOAD and advice.compute_head
            span.set_attribute("cake.head_hint", advice.head_hint)
            job = PrefillJob(
                req.request_id, req.tokens, space, hit, compute_head, req.sampling,
                req.deadline, advice.head_hint, memory=req.kv_mode == KvMode.CAKE,
                looked_up=req.kv_mode != KvMode.COMPUTE, fetched=advice.fetch,
            )  # fmt: skip
            subject = subjects.prefill(node) if node else subjects.COMPUTE_PREFILL
            accepted = await self.routed(node, subject, subjects.COMPUTE_PREFILL, job, Accepted)
            usable = usable_hit_chunks(len(keys), n_tokens, space.chunk_tokens)
            self.placement.placed(accepted.node, keys[:usable])
            if await self.cancelled_meanwhile(req, control):
                self.metrics.finished(req.kv_mode, "cancelled")
                return
            staged: dict[int, str] = {}
            span.set_attribute("cake.memory_chunks", accepted.pooled)
            if hit and accepted.pooled >= hit:
                split, outcome = Split(hit, hit), "memory"  # compute holds every hit chunk
            elif hit and not advice.fetch:
                split, outcome = Split(hit, hit), "no_fetch"  # too short to split: compute all
                for each in self.estimates(accepted.node):
                    each.loads_unobserved()
            elif hit and not await self.dispatch_fetch(req, space, hit, accepted.node):
                split, outcome = Split(hit, hit), "no_loader"  # compute takes it all
                self.link_lost(accepted.node)
            elif hit:
                split, staged, outcome = await self.watch(
                    req, hit, compute_head, events, control, estimator, accepted.node
                )
                if outcome == "cancelled":
                    self.metrics.finished(req.kv_mode, outcome)
                    return
            else:
                split, outcome = Split(0, 0), "no_hit"
        span.set_attribute("cake.meet_chunk", split.meet)
        meet = Meet(req.request_id, split.meet, hit, {j: staged[j] for j in split.loaded})
        await self.bus.publish(subjects.control(req.request_id), meet)
        self.metrics.finished(req.kv_mode, outcome, split.meet, hit)

    async def dispatch_fetch(self, req: GenerateRequest, space: Space, hit: int, node: str) -> bool:
        """Hand the fetch to the loader beside the compute replica; False if none answers."""
        fetch = FetchJob(req.request_id, req.tokens, space, hit, req.deadline)
        try:
            await self.bus.request(
                subjects.fetch(node), fetch, Accepted, self.settings.rpc_timeout_s
            )
        except (Unavailable, RemoteError) as exc:
            log.warning("no loader on the compute node; computing everything", error=str(exc))
            return False
        return True

    async def watch(
        self,
        req: GenerateRequest,
        hit: int,
        compute_head: bool,
        events: Inbox,
        control: Inbox,
        estimator: SplitEstimator,
        node: str,
    ) -> tuple[Split, dict[int, str], str]:
        """Follow computed/loaded events until the frontiers meet (or loads can no longer help);
        the split, the staged chunks and how it ended (met, resumed_head, stalled, or cancelled:
        the client's Cancel came, and a stall it caused says nothing of the link).

        The paces of `estimator` (the one the request was advised from) tell when loads fall
        behind. Stalls and timed-out reads tell every estimate of `node` (where it runs) that
        the link is slow; the pace itself comes from telemetry (see on_telemetry).
        """
        tracker = MeetTracker(hit, compute_head=compute_head)
        staged: dict[int, str] = {}
        start = time.monotonic()
        batch = min(hit, self.settings.fetch_concurrency)  # reads in flight at once
        arrivals: list[float] = []
        reads_s: list[float] = []  # each loaded chunk's read time
        split, outcome = tracker.meet(), "met"
        if await self.cancelled_meanwhile(req, control):  # before the loader listened
            return Split(hit, hit), staged, "cancelled"
        news_at = start  # the last event
        while split is None:
            since = time.monotonic() - news_at
            timeout = min(self.settings.fetch_timeout_s - since, req.deadline - time.time())
            overdue_in = self.loads_overdue_in(req, tracker, arrivals, reads_s, start, estimator)
            due = min(timeout, overdue_in)
            try:
                event = (await events.next(min(due, CANCEL_CHECK_S))).message
            except RequestTimeout:
                if await self.cancelled_meanwhile(req, control):  # both sides stopped for it
                    return Split(hit, hit), staged, "cancelled"
                if due > CANCEL_CHECK_S:  # only a look for the client's Cancel
                    continue
                if overdue_in < timeout:  # a load-only plan fell behind: compute the head too
                    pace = loads_pace(arrivals, start, time.monotonic(), batch)
                    await self.start_head(req, tracker, pace, estimator)
                    outcome, news_at = "resumed_head", time.monotonic()
                    continue
                log.warning("no progress; compute takes the rest", frontier=tracker.load_frontier)
                if not tracker.stepping:  # else the wait is compute's (it failed, or died in
                    self.link_lost(node)  # a step the loads stopped short of)
                split, outcome = Split(tracker.load_frontier, hit), "stalled"
                break
            news_at = time.monotonic()
            if isinstance(event, ChunkComputed):
                tracker.on_computed(event.upto)
            elif isinstance(event, HeadComputing):
                tracker.on_head_step(event.upto)
            elif isinstance(event, ChunkLoaded):
                arrivals.append(time.monotonic())
                reads_s.append(event.duration_s)
                staged[event.index] = event.staged
                tracker.on_loaded(event.index)
                if self.loads_fell_behind(req, tracker, arrivals, start, batch, estimator):
                    pace = loads_pace(arrivals, start, arrivals[-1], batch)
                    await self.start_head(req, tracker, pace, estimator)
                    outcome = "resumed_head"
            elif isinstance(event, LoadFailed):
                log.warning("chunk load failed", chunk=event.index, reason=event.reason)
                tracker.on_failed(event.index)
                if event.reason == "timeout":  # a stalled read says the link is slow
                    self.link_lost(node)
            split = tracker.meet()
        if outcome == "resumed_head":  # the skip was the estimate's mistake
            slow = pace_at_least(arrivals, start, time.monotonic(), max(1, batch))
            for each in self.estimates(node):
                each.skip_was_wrong(slow)
        return split, staged, outcome

    @staticmethod
    def replannable(req: GenerateRequest, tracker: MeetTracker) -> bool:
        """Whether this is a load-only Cake plan (kv_mode=load asked for loads only)."""
        return not tracker.compute_head and req.kv_mode == KvMode.CAKE

    def loads_fell_behind(
        self,
        req: GenerateRequest,
        tracker: MeetTracker,
        arrivals: list[float],
        started: float,
        batch: int,
        estimator: SplitEstimator,
    ) -> bool:
        """Whether a load-only Cake plan's loads arrive too slowly to have earned the skip."""
        if not self.replannable(req, tracker):
            return False
        compute_s, ratio = estimator.compute_s.value, self.settings.skip_head_ratio
        return loads_too_slow(arrivals, started, compute_s, ratio, batch)

    def loads_overdue_in(
        self,
        req: GenerateRequest,
        tracker: MeetTracker,
        arrivals: list[float],
        reads_s: list[float],
        start: float,
        estimator: SplitEstimator,
    ) -> float:
        """Seconds until a load-only Cake plan counts as behind its pace (inf: not one)."""
        if not self.replannable(req, tracker):
            return math.inf
        cap, prior = self.settings.fetch_timeout_s, estimator.load_s.value
        due = loads_overdue_after(arrivals, reads_s, start, prior, cap)
        return max(0.0, due - time.monotonic())

    async def start_head(
        self, req: GenerateRequest, tracker: MeetTracker, pace_s: float, estimator: SplitEstimator
    ) -> None:
        """Tell compute to compute the head after all, with a hint of where it meets loads that
        go on at pace_s a chunk (never below the chunks failed loads left to compute); the
        frontiers then meet as usual."""
        hint = resume_hint(tracker.load_frontier, pace_s, estimator.compute_s.value)
        hint = max(hint, tracker.floor) if hint >= 0 else hint
        log.info("loads fell behind their pace; computing the head", pace_s=pace_s, hint=hint)
        tracker.compute_head = True
        span = trace.get_current_span()
        span.set_attributes({"cake.resumed_head": True, "cake.resume_hint": hint})
        await self.bus.publish(subjects.control(req.request_id), StartHead(req.request_id, hint))

    def registry(self) -> CollectorRegistry:
        """This service's metric families."""
        return self.metrics.registry

    async def drain(self) -> None:
        """Let requests being coordinated finish (bounded by the RPC timeout)."""
        await self.tasks.wait(self.settings.rpc_timeout_s)


async def build(bus: Bus, settings: Settings, _: AsyncExitStack) -> Merger:
    """A merger (it holds no resources of its own)."""
    return Merger(bus, settings)
