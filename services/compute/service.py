"""The compute service: owns the model. Head chunks, the merge, suffix prefill and decoding."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, Literal

import structlog
import torch
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span
from prometheus_client import CollectorRegistry

from services.compute.job import Job
from services.compute.metrics import KINDS, ComputeMetrics
from services.compute.telemetry import StepWindow
from shared.core.admission import Admission, Overloaded, TooLarge
from shared.core.errors import (
    BadRequestError,
    CorruptChunkError,
    ErrorCode,
    RemoteError,
    TransportError,
)
from shared.core.keys import KeySpace, PromptChunks, pack_tokens, unpack_tokens
from shared.core.request import FinishReason
from shared.core.scheduler import Phase, Piece, plan_step
from shared.core.step_budget import StepBudget, TokenPace
from shared.kv.codec import decode_chunk
from shared.kv.engine import encode_chunk_at
from shared.kv.model import ModelRunner, default_kv_budget_bytes, pick_token
from shared.kv.pool import PrefixPool
from shared.kv.slots import SlotCache
from shared.kv.upload import mover
from shared.runtime.config import Settings
from shared.runtime.observability import tracer
from shared.runtime.service import Service
from shared.storage.staging import Staging
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import (
    Accepted,
    Alive,
    Cancel,
    ChunkComputed,
    ChunkLoaded,
    ComputeTelemetry,
    Failed,
    HeadComputing,
    LookupReply,
    LookupRequest,
    Meet,
    Message,
    ModelInfo,
    Prefilled,
    PrefillJob,
    Space,
    StartHead,
    StoreJob,
    Tokens,
)  # fmt: skip

log = structlog.get_logger(__name__)
WRITEBACK_DRAIN_S = 5.0  # how long finished jobs' write-backs may take at shutdown
Outbox = list[tuple[str, Message, Context]]  # subject, message, trace context to send it in


@dataclass(frozen=True)
class Work:
    """A piece of a step that runs through the model: its request, what it is, its tokens."""

    job: Job
    kind: Literal["head", "suffix", "decode"]
    tokens: Sequence[int]
    chunks: int = 0  # head chunks it computes


class Compute(Service):
    """The model, its scheduler loop and the jobs in flight."""

    name = "compute"

    def __init__(self, bus: Bus, runner: ModelRunner, staging: Staging, settings: Settings) -> None:
        super().__init__(bus, settings)
        self.runner, self.staging = runner, staging
        self.to_device = mover(runner.device)  # loaded KV onto the device (shared.kv.upload)
        self.chunk_compute_s = 0.0  # a head chunk's cost, measured by build()
        self.token_pace = TokenPace()  # a prompt token's cost in a step (sizes steps to loads)
        self.secret = settings.kv_secret_bytes()  # the MAC of chunks written and read
        self.jobs: dict[str, Job] = {}
        self.finishing: dict[str, Job] = {}  # out of the scheduler, write-back or Done pending
        self.pool_stale = False  # admissions changed the room the memory tier may use
        self.window = StepWindow()
        self.step_budget = (
            StepBudget(settings.target_itl_ms / 1000, settings.chunk_tokens, settings.token_budget)
            if settings.target_itl_ms is not None and settings.controllers else None
        )  # fmt: skip
        self.wake = asyncio.Event()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cake-writeback")
        self.stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cake-step")
        self.stepping: asyncio.Future[Outbox] | None = None  # the step being computed
        budget = settings.kv_memory_bytes or default_kv_budget_bytes(runner.device)
        self.admission = Admission(budget, settings.max_waiting)
        self.metrics = ComputeMetrics(
            lambda: len(self.admission.running),
            lambda: sum(job.kv_bytes() for job in list(self.jobs.values())),
            settings.token_budget,
        )
        self.metrics.watch_admission(self.admission)
        # the first cache tier: prompt chunks' KV kept in the budget's free part
        self.pool = PrefixPool(self.metrics.evicted.inc) if settings.memory_tier else None
        self.to_remember: list[tuple[Job, range]] = []  # chunks for the memory tier (remember)
        if self.pool is not None:
            self.metrics.watch_pool(self.pool)

    def model_info(self) -> ModelInfo:
        """What this replica serves."""
        space = KeySpace(self.runner.fingerprint, self.runner.layout, self.settings.chunk_tokens)
        return ModelInfo(
            self.runner.name, Space.of(space), self.runner.max_context, self.settings.node,
            self.chunk_compute_s,
        )  # fmt: skip

    async def start(self) -> None:
        """Subscribe and start the scheduler loop."""
        queue = subjects.QUEUE_COMPUTE
        await self.bus.handle(subjects.COMPUTE_INFO, self.on_info, queue=queue)
        for subject in (subjects.COMPUTE_PREFILL, subjects.prefill(self.settings.node)):
            await self.bus.handle(subject, self.on_prefill, queue=queue)  # any node's, or ours
        self.loops.spawn(self.loop())
        self.loops.spawn(self.heartbeat())
        self.loops.spawn(self.publish_telemetry(self.telemetry))

    async def heartbeat(self) -> None:
        """Every CAKE_HEARTBEAT_S, Alive on the stream of each request held: the gateway fails a
        request whose stream stays silent for three (compute gone) instead of waiting for its
        deadline. From the event loop, so a long step does not silence it."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            held = [r for r, j in list(self.jobs.items()) if not j.finish_reason]
            done_pending = [
                r for r, j in list(self.finishing.items())
                if j.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
            ]  # fmt: skip
            for rid in held + done_pending:
                with contextlib.suppress(TransportError):
                    await self.bus.publish(subjects.stream(rid), Alive(rid))

    async def on_info(self, _: Message, __: str) -> Message:
        """Answer with the model info."""
        return self.model_info()

    async def on_prefill(self, msg: Message, _: str) -> Message:
        """Take a job; the scheduler runs it."""
        assert isinstance(msg, PrefillJob)
        rid = msg.request_id
        space = msg.space.key_space()
        if space.model_fingerprint != self.runner.fingerprint:
            raise RemoteError(ErrorCode.BAD_REQUEST, "job is for another model")
        self.check_job(msg)
        prompt = await asyncio.to_thread(PromptChunks.of, space, unpack_tokens(msg.tokens))
        if not prompt.token_ids or max(prompt.token_ids) >= self.runner.vocab_size:
            raise BadRequestError(f"token ids must be in [0, {self.runner.vocab_size})")
        budget = self.settings.token_budget // space.chunk_tokens * space.chunk_tokens
        head_piece = max(1, min(self.settings.head_tokens, budget) // space.chunk_tokens)
        if self.settings.exact_splits:  # one chunk per forward: KV bit-identical in every mode
            budget, head_piece = space.chunk_tokens, 1
            msg.head_hint = -1
        stop_ids = self.runner_stop_ids()
        memory = msg.memory and self.pool is not None
        job = Job(
            msg, prompt, stop_ids, None, piece=budget, head_piece=head_piece,
            generator=self.runner.sampler(msg.sampling), memory=memory,
            token_pace=self.token_pace if self.settings.controllers else None,
            loads_batch=self.settings.fetch_concurrency,
        )  # fmt: skip
        try:  # by projected KV: the prompt and every token it may generate
            admitted = self.admission.offer(rid, job.capacity * space.layout.bytes_per_token)
        except (Overloaded, TooLarge) as exc:  # refused: the merger tells the client
            self.metrics.refused.labels(reason=exc.code).inc()
            raise
        pooled = 0
        if admitted:  # the chunks it will take are kept for it (prepare); a waiting job's may go
            self.admit(job)
            usable = (len(prompt.token_ids) - 1) // space.chunk_tokens
            pooled = (
                self.pool.prefix(prompt.keys[:usable]) if self.pool is not None and memory else 0
            )
        if not msg.fetched:  # no loads to race or wait for: the whole prompt is one prefill
            job.meet = job.hit
        self.jobs[rid] = job
        self.wake.set()
        job.listening = [  # before Accepted: the merger's words come after it
            await self.bus.handle(subjects.control(rid), self.on_control),
            await self.bus.handle(subjects.cancel(rid), self.on_cancel),
            await self.bus.handle(subjects.events(rid), self.on_event),
        ]
        return Accepted(node=self.settings.node, pooled=pooled)

    def check_job(self, msg: PrefillJob) -> None:
        """A job is checked here, not trusted for coming over NATS: its space is this model's,
        its tokens and max_tokens within the model's context and CAKE_MAX_TOKENS_LIMIT."""
        if msg.space.key_space().chunk_tokens != self.settings.chunk_tokens:
            raise BadRequestError(
                f"chunks of this replica hold {self.settings.chunk_tokens} tokens"
            )
        if not 0 < msg.sampling.max_tokens <= self.settings.max_tokens_limit:
            raise BadRequestError(f"max_tokens must be in [1, {self.settings.max_tokens_limit}]")
        if problem := msg.sampling.problem(self.runner.vocab_size):
            raise BadRequestError(problem[1])
        n = len(msg.tokens) // 4
        if self.runner.max_context and n + msg.sampling.max_tokens > self.runner.max_context:
            raise BadRequestError(
                f"{n} prompt tokens and max_tokens {msg.sampling.max_tokens} exceed the model's "
                f"context of {self.runner.max_context}"
            )
        if not 0 <= msg.hit <= max(0, n - 1) // self.settings.chunk_tokens:
            raise BadRequestError(f"hit {msg.hit} is not a number of the prompt's chunks")

    def admit(self, job: Job) -> None:
        """The job may run: its KV slot (prompt + max_tokens, what admission reserved); the
        memory tier gives up what the running jobs now reserve."""
        job.cache = self.runner.new_cache(capacity=job.capacity)
        self.pool_stale = True  # the memory tier shrinks before the next step (its thread)

    def pool_room(self) -> int:
        """Bytes the memory tier may hold: the KV budget that running jobs do not reserve."""
        return self.admission.budget_bytes - self.admission.reserved_bytes

    def runner_stop_ids(self) -> frozenset[int]:
        """End-of-sequence ids of the model (its config's and its generation config's)."""
        ids: set[int] = set()
        generation = getattr(self.runner.model, "generation_config", None)
        for eos in (self.runner.config.eos_token_id, getattr(generation, "eos_token_id", None)):
            ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
        return frozenset(ids)

    async def on_event(self, msg: Message, subject: str) -> None:
        """Note staged chunks of our jobs, so head steps stop where loaded chunks begin and
        each is copied into its slot as it arrives (see place_loaded)."""
        if isinstance(msg, ChunkLoaded):
            job = self.jobs.get(subjects.request_id_of(subject))
            if job is not None and 0 <= msg.index < job.hit and not job.merged:
                job.staged[msg.index] = msg.staged  # before the frontier moves past it
                job.loads.on_loaded(msg.index)
                job.load_arrivals.append(time.monotonic())
                job.news_at = time.monotonic()
                job.meet_if_reached()
                self.wake.set()

    async def on_cancel(self, msg: Message, subject: str) -> None:
        """Cancel: drop the job."""
        job = self.jobs.get(subjects.request_id_of(subject))
        if job is not None and isinstance(msg, Cancel):
            job.finish_reason = FinishReason.CANCELLED
            self.wake.set()

    async def on_control(self, msg: Message, subject: str) -> None:
        """The merger's word: Meet: use these staged chunks. StartHead: compute the head too."""
        job = self.jobs.get(subjects.request_id_of(subject))
        if job is None:
            return
        job.news_at = time.monotonic()
        if isinstance(msg, StartHead):  # the loads fell behind: race them after all, towards
            job.msg.compute_head = True  # the merger's new hint (the skip advice's was 0)
            job.msg.head_hint = msg.head_hint if 0 <= msg.head_hint <= job.hit else -1
            job.resumed = True
        elif isinstance(msg, Meet) and job.meet is None and not job.decoding:
            if msg.hit != job.hit or not 0 <= msg.meet <= job.hit:
                log.warning("Meet outside the job's hit ignored", meet=msg.meet, hit=msg.hit)
                return
            job.meet = msg.meet
            job.staged.update({j: p for j, p in msg.staged.items() if msg.meet <= j < job.hit})
        self.wake.set()

    # --- the scheduler loop -----------------------------------------------------------------

    async def loop(self) -> None:
        """Run steps while there is runnable work; sleep until a message wakes it (or the
        next deadline passes). An error outside a job (NATS gone) is logged, not fatal."""
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that comes
            # as the awaited wait ends, and the loop would outlive its service
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.until_next_deadline()):
                    await self.wake.wait()
            self.wake.clear()
            try:
                while await self.step():
                    pass
            except Exception:
                log.exception("scheduler step failed")
                await asyncio.sleep(0.1)

    async def step(self) -> bool:
        """One scheduler step and its messages; False when nothing was runnable."""
        await self.expire()
        loop = asyncio.get_running_loop()
        # Plan only the jobs prepare() saw: one that arrives while it runs has not taken its
        # chunks from the memory tier yet, so it waits a step rather than compute them.
        prepared = list(self.jobs.values())
        await self.send(await loop.run_in_executor(self.stepper, self.prepare))
        self.meet_reached_loads()
        candidates = [job.candidate() for job in prepared if job.msg.request_id in self.jobs]
        now = time.monotonic()
        for c in candidates:  # a head's cost counts from when it could run
            if c.phase != Phase.HEAD:
                self.jobs[c.request_id].head_ready_at = now
        budget = self.settings.token_budget
        decodes = sum(1 for c in candidates if c.phase == Phase.DECODE)
        if self.step_budget is not None:  # prompt tokens, and a token for each decode on top
            budget = min(budget, self.step_budget.for_step(decodes > 0) + decodes)
        due = self.due_budget(now)
        step = plan_step(
            candidates, budget, self.settings.decode_share,
            finish_first=self.settings.controllers, prompt_cap=due,
        )  # fmt: skip
        if step:
            self.metrics.budget.set(budget if due is None else min(budget, due + decodes))
        self.metrics.planned(candidates, step)
        self.metrics.heads_waiting.set(sum(1 for job in prepared if job.waits_for_its_loads()))
        self.metrics.chunk_step.set(self.token_pace.chunk_step_s or 0.0)
        chosen = {piece.request_id for piece in step}
        for c in candidates:  # steps waited while runnable (what aging counts)
            runnable = c.phase < Phase.WAITING and c.tokens > 0
            self.jobs[c.request_id].waited = (
                c.waited + 1 if runnable and c.request_id not in chosen else 0
            )
        if step:
            await self.send(self.heads_computing(step))
            started = time.perf_counter()
            with self.step_span(step):
                loop = asyncio.get_running_loop()
                self.stepping = loop.run_in_executor(self.stepper, self.run_step, step)
                outbox = await asyncio.shield(self.stepping)
            seconds = time.perf_counter() - started
            self.metrics.step_seconds.observe(seconds)
            self.note_step(step, seconds)
            self.meet_reached_loads()
            if self.step_budget is not None:
                decoded = any(p.phase == Phase.DECODE for p in step)
                self.step_budget.observe(seconds, decoded)
            await self.send(outbox)
        if self.to_remember:
            await asyncio.get_running_loop().run_in_executor(self.stepper, self.keep_remembered)
        self.start_writebacks()
        await self.retire()
        return bool(step)

    def meet_reached_loads(self) -> None:
        """Jobs whose head (a step, or the memory tier in prepare) reached their loads meet
        them there (Job.meet_if_reached), on the event loop."""
        for job in self.jobs.values():
            job.meet_if_reached()

    def heads_computing(self, step: list[Piece]) -> Outbox:
        """HeadComputing for each head in the step, so that its loader does not read the chunks
        the step computes meanwhile."""
        outbox: Outbox = []
        for piece in step:
            if piece.phase == Phase.HEAD:
                job, rid = self.jobs[piece.request_id], piece.request_id
                upto = job.head_done + piece.tokens // job.chunk
                outbox.append((subjects.events(rid), HeadComputing(rid, upto), job.ctx))
        return outbox

    def due_budget(self, now: float) -> int | None:
        """With controllers: the prompt tokens a step can run before the first request waiting
        for its loads has them all, so that the step ends when it can go on rather than make it
        wait out a long prefill (None: nobody waits on loads of a known pace)."""
        if not self.settings.controllers:
            return None
        due = [d for job in self.jobs.values() if (d := job.loads_due_in(now)) is not None]
        return self.token_pace.tokens_within(min(due), self.settings.chunk_tokens) if due else None

    def note_step(self, step: list[Piece], seconds: float) -> None:
        """Count a step in the telemetry window and the token pace (steps with a chunk of
        prompt work or more: a merge piece runs no forward pass); each head piece's cost runs
        from when its job could run as a head to now (the queueing a busy replica adds is part
        of it)."""
        tokens: dict[str, int] = {}
        now = time.monotonic()
        for piece in step:
            kind = KINDS[piece.phase]
            tokens[kind] = tokens.get(kind, 0) + piece.tokens
            job = self.jobs.get(piece.request_id)
            if piece.phase == Phase.HEAD and job is not None:
                self.window.head(piece.tokens // job.chunk, now - job.head_ready_at)
                job.head_ready_at = now
        self.window.step(seconds, tokens)
        if sum(tokens.values()) - tokens.get("decode", 0) >= self.settings.chunk_tokens:
            self.token_pace.observe(seconds, sum(tokens.values()), self.settings.chunk_tokens)

    def telemetry(self) -> ComputeTelemetry:
        """The window since the last call; a new one opens."""
        window, self.window = self.window, StepWindow()
        running = sum(1 for j in self.jobs.values() if j.admitted)
        pool_bytes = self.pool.bytes if self.pool is not None else 0
        return window.message(
            self.settings.node, running, len(self.jobs) - running, pool_bytes,
            self.admission.budget_bytes,
        )  # fmt: skip

    def step_span(self, step: list[Piece]) -> AbstractContextManager[Span]:
        """A span of its own for one scheduler step, linked to the trace of every request in it
        (a step serves many requests, so it belongs to none of their traces)."""
        links = [
            Link(trace.get_current_span(self.jobs[p.request_id].ctx).get_span_context())
            for p in step
        ]
        tokens: dict[str, int] = {}
        for p in step:
            name = f"cake.step.{p.phase.name.lower()}_tokens"
            tokens[name] = tokens.get(name, 0) + p.tokens
        return tracer(__name__).start_as_current_span(
            "scheduler.step", context=Context(), links=links, attributes=tokens
        )

    async def send(self, outbox: Outbox) -> None:
        """Publish a step's messages, each in its request's trace (one failure loses one)."""
        for subject, message, ctx in outbox:
            token = otel_context.attach(ctx)
            try:
                await self.bus.publish(subject, message)
            except TransportError as exc:
                log.warning("message not sent", subject=subject, error=str(exc))
            finally:
                otel_context.detach(token)

    def until_next_deadline(self) -> float:
        """Seconds until the earliest job deadline, or the end of a head's wait for its loads
        (at most a second; idle: a minute)."""
        if not self.jobs:
            return 60.0
        now, wall = time.monotonic(), time.time()
        ends = [j.msg.deadline - wall for j in self.jobs.values()]
        ends += [
            w for j in self.jobs.values()
            if j.awaits_merger() and (w := j.waits_for_loads(now)) is not None
        ]  # fmt: skip
        return max(0.01, min(1.0, *ends))

    async def expire(self) -> None:
        """Fail jobs past their deadline; a job left waiting for the merger longer than the
        merger itself would wait (a fetch timeout and two hops) goes on alone."""
        now = time.time()
        patience = self.settings.fetch_timeout_s + 2 * self.settings.rpc_timeout_s
        for rid, job in list(self.jobs.items()):
            if now > job.msg.deadline and not job.finish_reason:
                job.finish_reason = FinishReason.DEADLINE
                failed = Failed(rid, ErrorCode.DEADLINE, "the request ran past its deadline")
                await self.bus.publish(subjects.stream(rid), failed)
            elif not job.awaits_merger():
                job.news_at = time.monotonic()  # the wait for a word starts when it waits
            elif time.monotonic() - job.news_at > patience:
                decided = job.go_on_alone()
                log.warning("no word from the merger; going on alone", request_id=rid, did=decided)
                self.metrics.went_on_alone.labels(decided=decided).inc()

    def start_writebacks(self) -> None:
        """Write back the new chunks of jobs whose first token is out (off the critical path)."""
        for job in self.jobs.values():
            if job.prefilled is not None and job.writeback is None:
                job.writeback = self.tasks.spawn(self.write_back(job))

    async def write_back(self, job: Job) -> None:
        """Stage the prompt's chunks that this node's store lacks and ask its loader to store
        them."""
        otel_context.attach(job.ctx)  # this task's own context: no need to detach
        rid = job.msg.request_id
        start = max(job.hit, await self.stored_prefix(job))
        try:  # its own thread: a burst of write-backs never queues a scheduler step
            loop = asyncio.get_running_loop()
            staged = await loop.run_in_executor(self.writer, self.stage_writeback, job, start)
        except Exception as exc:  # staging full, out of memory: the cache just misses next time
            log.warning("write-back skipped", request_id=rid, error=str(exc))
            self.staging.discard_request(f"{rid}-wb")
            return
        if not staged:
            return
        store_job = StoreJob(f"{rid}-wb", job.msg.tokens, job.msg.space, staged)
        try:
            await self.bus.request(
                subjects.store(self.settings.node), store_job, Accepted,
                self.settings.fetch_timeout_s,
            )  # fmt: skip
        except TransportError as exc:
            log.warning("write-back not confirmed", request_id=rid, error=str(exc))
            self.staging.discard_request(f"{rid}-wb")

    async def retire(self) -> None:
        """Take jobs that are done out of the scheduler; finish() does the rest."""
        for rid, job in list(self.jobs.items()):
            if not job.finish_reason:
                continue
            del self.jobs[rid]
            await self.bus.unhandle(*job.listening)
            self.metrics.finished.labels(finish_reason=job.finish_reason).inc()
            self.staging.discard_request(rid)
            self.finishing[rid] = job
            self.tasks.spawn(self.finish(job))

    async def finish(self, job: Job) -> None:
        """After its write-back (which still reads its slot): its KV memory goes back, waiting
        jobs are admitted, then Done, so the next request with this prefix hits. Until then it
        stays Alive for the gateway."""
        otel_context.attach(job.ctx)  # this task's own context: no need to detach
        rid = job.msg.request_id
        try:
            if job.writeback is not None:
                await asyncio.gather(job.writeback, return_exceptions=True)
            ran_s = time.monotonic() - job.arrival if job.admitted else None
            job.cache = None
            for started in self.admission.release(rid, ran_s):  # each offered job is in jobs
                self.admit(self.jobs[started])
                self.wake.set()
            if job.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                assert job.prefilled is not None
                done = job.prefilled.done(job.finish_reason, job.generated)
                await self.bus.publish(subjects.stream(rid), done)
        finally:
            self.finishing.pop(rid, None)

    def prefilled_message(self, job: Job) -> Prefilled:
        """Where the prompt's KV came from, once the first token is out."""
        meet = job.meet if job.meet is not None else job.hit
        chunk, n = job.chunk, len(job.prompt.token_ids)
        loaded, total, reused = job.hit - meet, math.ceil(n / chunk), len(job.reused)
        head = meet - sum(1 for i in job.reused if i < meet)  # head chunks really computed
        return Prefilled(
            job.msg.request_id, n, job.hit * chunk, total, total - loaded - reused, loaded, meet,
            job.ttft_ms, loaded * chunk, head * chunk, reused * chunk, self.settings.node,
        )  # fmt: skip

    # --- one step, in the worker thread -----------------------------------------------------

    def prepare(self) -> Outbox:
        """Before planning a step: copy loaded chunks and chunks from the memory tier into the
        slots, and merge the loads of jobs past their meeting point, so the suffix is planned in
        this step (the step's thread, so no step runs meanwhile)."""
        for job in list(self.jobs.values()):
            self.place_loaded(job)
            self.merge_if_met(job)
        if self.pool is None:
            return []
        if self.to_remember or self.pool_stale:  # (what jobs are about to take, only then)
            jobs = list(self.jobs.values())
            wanted = {j.prompt.keys[i] for j in jobs for i in j.chunks_to_fill()}
            if wanted & self.remembered_keys():  # a merge just filled chunks a job waits for
                self.keep_remembered()
            if self.pool_stale:  # give running jobs their room, keeping what they will take
                self.pool_stale = False
                self.pool.shrink(self.pool_room(), wanted)
        return self.reuse_pooled()

    def place_loaded(self, job: Job) -> None:
        """Copy the job's newly staged chunks into their places in its slot, past its computed
        head, so the merge copies nothing (a chunk that cannot be read is left to the merge)."""
        if not job.admitted or job.merged or job.finish_reason:
            return
        assert isinstance(job.cache, SlotCache)
        for j in job.placeable():
            try:
                kv = self.read_staged(job, j)
            except (OSError, ValueError, CorruptChunkError):
                continue
            job.cache.place(job.prompt.space.chunk_bounds(j)[0], kv)
            job.placed.add(j)
            self.metrics.placed.labels(placed="on_arrival").inc()
            self.staging.discard(job.staged[j])

    def merge_if_met(self, job: Job) -> None:
        """Merge the loaded chunks of a job whose head reached the meeting point (no forward
        pass: a step of its own for it would cost a whole step of everyone else's pieces). A
        job that meets at its hit's end uses no loaded chunk: it has nothing to merge, and the
        rest of its head and its suffix are one prefill (one piece, not a step each)."""
        if not job.admitted or job.merged or job.finish_reason or job.decoding:
            return
        met = job.meet  # read once: the Meet may land meanwhile (the event loop's)
        meet = met if met is not None else job.hit
        if met is not None and meet >= job.hit and job.head_done < meet:
            job.merged = True  # what was placed past the head is overwritten as it is computed
        elif job.head_done >= meet:
            token = otel_context.attach(job.ctx)  # its span belongs to the request's trace
            try:
                self.merge_loaded(job, from_chunk=max(job.head_done, meet))
            finally:
                otel_context.detach(token)

    def read_staged(self, job: Job, j: int) -> torch.Tensor:
        """A staged chunk's KV on the compute device, from its mapped file (the loader verified
        it before staging it: only the header is checked here)."""
        data = self.staging.map(str(self.staging.owned(job.staged[j], job.msg.request_id)))
        ident = job.prompt.identity(j)
        return decode_chunk(data, ident, False, self.secret, self.to_device)

    def reuse_pooled(self) -> Outbox:
        """Fill jobs' next prompt chunks from the memory tier. A job whose next chunk is not
        there but an earlier job will fill it waits for that job: requests with a common
        prefix compute it once."""
        assert self.pool is not None
        outbox: Outbox = []
        filler: dict[str, Job] = {}  # chunk key -> the earliest job that will fill it
        for job in sorted(self.jobs.values(), key=lambda j: j.arrival):
            for i in job.chunks_to_fill():
                filler.setdefault(job.prompt.keys[i], job)
        for job in list(self.jobs.values()):
            head_done = job.head_done
            if self.take_pooled(job, filler) and job.head_done > head_done:
                rid = job.msg.request_id  # the merger follows the compute frontier
                computed = ChunkComputed(rid, job.head_done, 0.0, reused=True)
                outbox.append((subjects.events(rid), computed, job.ctx))
        return outbox

    def take_pooled(self, job: Job, filler: dict[str, Job]) -> int:
        """Copy the job's next chunks from the memory tier into its slot; how many. Blocked
        when the first one missing is one an earlier job will fill."""
        assert self.pool is not None
        taken, job.blocked = 0, False
        while (i := job.next_chunk()) is not None:
            key = job.prompt.keys[i]
            kv = self.pool.get(key)
            if kv is None:
                job.blocked = filler.get(key, job) is not job
                break
            assert isinstance(job.cache, SlotCache)
            job.cache.append(kv)
            job.reused.add(i)
            job.head_done += 0 if job.merged else 1
            taken += 1
        if taken:
            self.metrics.reused.inc(taken)
            self.pool.touch(job.prompt.keys[: max(job.reused) + 1])
        return taken

    def remember(self, job: Job, chunks: range) -> None:
        """Leave these complete prompt chunks in the memory tier, once the step's messages are
        out (keep_remembered): their copies are no part of anyone's time to first token."""
        if self.pool is not None and job.memory:
            self.to_remember.append((job, chunks))

    def remembered_keys(self) -> set[str]:
        """Keys of the chunks remember() noted, not yet copied into the memory tier."""
        return {job.prompt.keys[i] for job, chunks in self.to_remember
                for i in chunks if i < len(job.prompt.keys)}  # fmt: skip

    def keep_remembered(self) -> None:
        """Copy the chunks remember() noted from their jobs' slots into the memory tier (in the
        stepper thread: at the end of the step, before any of those jobs retires and gives its
        slot back, or in prepare() when another job waits for them). The tier is a cache: a
        copy that fails (out of memory) is left out."""
        pending, self.to_remember = self.to_remember, []
        for job, chunks in pending:
            cache = job.cache
            if self.pool is None or not isinstance(cache, SlotCache):
                continue
            try:
                for i in chunks:
                    if i >= len(job.prompt.keys) or job.prompt.keys[i] in self.pool:
                        continue
                    chunk = cache.chunk(*job.prompt.space.chunk_bounds(i))
                    if not self.pool.put(job.prompt.keys[i], chunk, self.pool_room()):
                        break
            except (RuntimeError, ValueError) as exc:  # (torch's out of memory is a RuntimeError)
                log.warning("chunks not kept in the memory tier", error=str(exc))
                continue
            self.pool.touch(job.prompt.keys[: chunks.stop])

    def run_step(self, step: list[Piece]) -> Outbox:
        """Plan each chosen piece, run all that need the model in one forward pass, finish
        each; the messages to publish afterwards."""
        outbox: Outbox = []
        work: list[Work] = []
        for piece in step:
            job = self.jobs[piece.request_id]
            with self.request_scope(job, outbox):
                planned = self.plan_piece(job, piece)
                if planned is not None:
                    work.append(planned)
        if not work:
            return outbox
        # exact splits: each piece alone, so its KV has the same bits as in any other mode
        for batch in [[w] for w in work] if self.settings.exact_splits else [work]:
            self.forward(batch, outbox)
        return outbox

    def forward(self, work: list[Work], outbox: Outbox) -> None:
        """One forward pass over these pieces, then each piece's follow-up."""
        started = time.time_ns()
        held = [self.runner.cache_length(w.job.kv_cache) for w in work]
        try:
            logits = self.runner.step([(w.job.kv_cache, w.tokens) for w in work])
        except Exception as exc:  # the pass failed (out of memory...): undo it
            for w, length in zip(work, held, strict=True):
                w.job.kv_cache.crop(length)
            if len(work) == 1:
                with self.request_scope(work[0].job, outbox):
                    raise exc
            else:  # each piece alone, so only a piece that fails alone ends
                for w in work:
                    self.forward([w], outbox)
            return
        for w, last in zip(work, logits, strict=True):
            with self.request_scope(w.job, outbox):
                self.finish_piece(w, last, started, outbox)

    @contextlib.contextmanager
    def request_scope(self, job: Job, outbox: Outbox) -> Iterator[None]:
        """In the request's trace and log context; a failure ends this request alone."""
        rid = job.msg.request_id
        token = otel_context.attach(job.ctx)
        try:
            with structlog.contextvars.bound_contextvars(request_id=rid):
                yield
        except Exception as exc:
            log.exception("request failed in compute", request_id=rid)
            job.finish_reason = FinishReason.FAILED
            failed = Failed(rid, ErrorCode.INTERNAL, f"compute failed: {exc}"[:500])
            outbox.append((subjects.stream(rid), failed, job.ctx))
        finally:
            otel_context.detach(token)

    def plan_piece(self, job: Job, piece: Piece) -> Work | None:
        """What the piece runs through the model (None: it needed no forward pass)."""
        if piece.phase == Phase.DECODE:
            return Work(job, "decode", (job.last_token,))
        if piece.phase == Phase.HEAD:
            return self.head_work(job, piece.tokens // job.chunk)
        return self.prefill_piece(job, piece.tokens)

    def head_work(self, job: Job, chunks: int) -> Work:
        """The next `chunks` head chunks."""
        first = job.prompt.space.chunk_bounds(job.head_done)[0]
        last = job.prompt.space.chunk_bounds(job.head_done + chunks - 1)[1]
        return Work(job, "head", job.prompt.token_ids[first:last], chunks)

    def prefill_piece(self, job: Job, tokens: int) -> Work | None:
        """After the meeting point: the rest of the head, then the merge (no forward pass),
        then the suffix (`tokens`: what the scheduler granted this piece); with nothing to merge
        (merge_if_met), the rest of the prompt at once."""
        meet = job.meet if job.meet is not None else job.hit
        if job.head_done < meet and not job.merged:
            return self.head_work(job, min(meet - job.head_done, tokens // job.chunk))
        if not job.merged:  # met after this step's prepare(): merge now, the suffix next step
            self.merge_if_met(job)
            return None
        held = self.runner.cache_length(job.kv_cache)
        return Work(job, "suffix", job.prompt.token_ids[held : held + tokens])

    def finish_piece(self, w: Work, logits: torch.Tensor, started_ns: int, outbox: Outbox) -> None:
        """After the pass: report head chunks, or pick the next token."""
        job, rid = w.job, w.job.msg.request_id
        if w.kind == "head":
            self.span("compute.chunk", started_ns, chunk=job.head_done, chunks=w.chunks)
            self.remember(job, range(job.head_done, job.head_done + w.chunks))
            job.head_done += w.chunks
            seconds = (time.time_ns() - started_ns) / 1e9
            outbox.append(
                (subjects.events(rid), ChunkComputed(rid, job.head_done, seconds), job.ctx)
            )
        elif w.kind == "decode":
            self.emit(job, self.sample(job, logits), outbox)
        else:
            self.span("compute.suffix", started_ns, tokens=len(w.tokens))
            held = self.runner.cache_length(job.kv_cache)
            self.remember(job, range((held - len(w.tokens)) // job.chunk, held // job.chunk))
            if self.runner.cache_length(job.kv_cache) == len(job.prompt.token_ids):
                self.first_token(job, logits, started_ns, outbox)

    def first_token(self, job: Job, logits: torch.Tensor, started_ns: int, outbox: Outbox) -> None:
        """The prompt is prefilled: where its KV came from, then its first token."""
        self.span("compute.first_token", started_ns)
        job.ttft_ms = (time.monotonic() - job.arrival) * 1000
        job.prefilled = self.prefilled_message(job)
        outbox.append((subjects.stream(job.msg.request_id), job.prefilled, job.ctx))
        job.decoding = True
        self.emit(job, self.sample(job, logits), outbox)

    def sample(self, job: Job, logits: torch.Tensor) -> int:
        """The next token from these logits, as the request's sampling says."""
        return pick_token(logits.cpu(), job.msg.sampling, job.generator, job.prompt_ids, job.output)

    def emit(self, job: Job, token: int, outbox: Outbox) -> None:
        """Stream one new token; the end of the request when it is a stop id or the last."""
        job.output.append(token)
        rid = job.msg.request_id
        if token in job.stop_ids:
            job.finish_reason = FinishReason.STOP
        elif job.generated >= job.msg.sampling.max_tokens:
            job.finish_reason = FinishReason.LENGTH
        tokens = Tokens(rid, pack_tokens([token]), last=job.finish_reason is not None)
        outbox.append((subjects.stream(rid), tokens, job.ctx))

    @staticmethod
    def span(name: str, started_ns: int, **attributes: int) -> None:
        """A span for one piece of a step: from the step's start to now, in the current trace."""
        tracer(__name__).start_span(name, start_time=started_ns, attributes=attributes).end()

    def merge_loaded(self, job: Job, from_chunk: int) -> None:
        """Make loaded chunks [from_chunk, hit) part of the cache: most were placed as they
        arrived; the rest are placed now. A chunk that cannot be read is computed instead."""
        with tracer(__name__).start_as_current_span("compute.merge"):
            assert isinstance(job.cache, SlotCache)
            for j in range(from_chunk, job.hit):
                if j in job.placed:
                    continue
                try:
                    job.cache.place(job.prompt.space.chunk_bounds(j)[0], self.read_staged(job, j))
                except (KeyError, OSError, ValueError, CorruptChunkError) as exc:
                    log.warning(
                        "staged chunk unusable; computing from it on", chunk=j, error=str(exc)
                    )
                    job.meet = job.hit  # compute the rest of the head instead
                    return
                job.placed.add(j)
                self.metrics.placed.labels(placed="at_merge").inc()
                self.staging.discard(job.staged[j])
            job.cache.extend_to(job.hit * job.chunk)
            self.remember(job, range(from_chunk, job.hit))
            job.meet = from_chunk
            job.merged = True
            job.head_done = max(job.head_done, from_chunk)

    async def stored_prefix(self, job: Job) -> int:
        """How many leading chunks of the job's prompt this node's store holds (0 when its
        loader does not say): a compute-only prompt had no lookup, and need not encode what is
        stored (its Done waits for that); any other job's hit is its lookup's answer."""
        if job.msg.looked_up or job.hit >= len(job.prompt.keys):
            return job.hit
        lookup = LookupRequest(f"{job.msg.request_id}-wb", job.msg.space, job.msg.tokens)
        try:
            reply = await self.bus.request(
                subjects.lookup(self.settings.node), lookup, LookupReply,
                self.settings.rpc_timeout_s,
            )  # fmt: skip
        except TransportError as exc:
            log.warning("write-back lookup failed; staging every chunk", error=str(exc))
            return 0
        return reply.stored_chunks

    def stage_writeback(self, job: Job, start: int) -> dict[int, str]:
        """Encode the prompt's complete chunks from `start` on into staging files."""
        staged = {}
        for i in range(start, len(job.prompt.keys)):
            data = encode_chunk_at(
                self.runner, job.kv_cache, job.prompt, i, self.settings.kv_codec, self.secret
            )
            staged[i] = self.staging.write(job.msg.request_id + "-wb", f"{i}.kv", data)
        return staged

    async def drain(self) -> None:
        """The step in progress ends (its messages go out); jobs still computing fail with
        503; finished ones get their Done once their write-backs land (bounded by close())."""
        if self.stepping is not None and not self.stepping.done():
            await self.send(await self.stepping)
        for rid, job in list(self.jobs.items()):
            if not job.finish_reason:
                job.finish_reason = FinishReason.FAILED
                failed = Failed(rid, ErrorCode.UNAVAILABLE, "the compute service is shutting down")
                with contextlib.suppress(TransportError):  # NATS gone too: the gateway times out
                    await self.bus.publish(subjects.stream(rid), failed)
        await self.retire()  # Done for the finished ones
        await self.tasks.wait(WRITEBACK_DRAIN_S)

    async def close(self) -> None:
        """The service's close, then the write-back and step threads."""
        await super().close()
        self.writer.shutdown(wait=False, cancel_futures=True)
        self.stepper.shutdown(wait=False, cancel_futures=True)

    def registry(self) -> CollectorRegistry:
        """This service's metric families."""
        return self.metrics.registry

    def describe(self) -> dict[str, Any]:
        """Model and fingerprint, for the ready log line."""
        return {"model": self.runner.name, "fingerprint": self.runner.fingerprint[:16]}


async def build(bus: Bus, settings: Settings, _: AsyncExitStack) -> Compute:
    """Load the model (in a thread; the bus is already connected) and wrap it."""
    runner = await asyncio.to_thread(
        ModelRunner.load, settings.model, settings.dtype, settings.device, settings.model_revision
    )
    compute = Compute(bus, runner, Staging(settings.staging_dir), settings)
    step = min(settings.head_tokens, settings.token_budget)  # a head step, as it runs
    compute.chunk_compute_s = await asyncio.to_thread(
        runner.measure_chunk_s, settings.chunk_tokens, max(step, settings.chunk_tokens)
    )  # the merger's first estimate: a fresh stack splits its first requests well
    compute.token_pace.observe(compute.chunk_compute_s, settings.chunk_tokens)
    log.info("measured a head chunk", seconds=round(compute.chunk_compute_s, 4))
    return compute
