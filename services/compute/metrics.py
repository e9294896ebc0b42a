"""The compute service's metric families, served on its own CAKE_METRICS_PORT."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.core.admission import Admission
from shared.core.errors import ErrorCode
from shared.core.scheduler import Candidate, Phase, Piece
from shared.kv.pool import PrefixPool
from shared.runtime.metrics import new_registry

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KINDS = {Phase.DECODE: "decode", Phase.PREFILL: "prefill", Phase.HEAD: "head"}


class ComputeMetrics:
    """The scheduler's load and steps, the KV memory of the jobs, and how requests ended."""

    def __init__(
        self,
        running: Callable[[], int],
        kv_bytes: Callable[[], int],
        token_budget: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        r = self.registry = registry or new_registry()
        self.running = Gauge(
            "cake_compute_requests_running",
            "Requests admitted: holding their KV memory, not finished",
            registry=r,
        )
        self.running.set_function(running)
        self.queue_depth = Gauge(
            "cake_compute_queue_depth",
            "Requests with work to run that the last step left out (over its token budget)",
            registry=r,
        )
        self.step_seconds = Histogram(
            "cake_compute_step_seconds",
            "Seconds one scheduler step ran (its forward passes)",
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.step_tokens = Gauge(
            "cake_compute_step_tokens",
            "Tokens of the most recent step by kind (decode, prefill, head): the budget in use",
            ("kind",),
            registry=r,
        )
        self.tokens = Counter(
            "cake_compute_tokens",
            "Tokens run in scheduler steps by kind (decode, prefill, head); per step: divide by "
            "cake_compute_step_seconds_count",
            ("kind",),
            registry=r,
        )
        self.budget = Gauge(
            "cake_compute_token_budget",
            "Tokens the last scheduler step could run (CAKE_TOKEN_BUDGET; less while requests "
            "decode under CAKE_TARGET_ITL_MS, or to end when a request's loads are due)",
            registry=r,
        )
        self.budget.set(token_budget)
        self.kv_bytes = Gauge(
            "cake_compute_kv_cache_bytes",
            "Bytes of the KV caches of the requests in the scheduler (keys and values)",
            registry=r,
        )
        self.kv_bytes.set_function(kv_bytes)
        self.finished = Counter(
            "cake_compute_requests_finished",
            "Requests that left the scheduler, by finish_reason (stop, length, cancelled, "
            "deadline, failed)",
            ("finish_reason",),
            registry=r,
        )
        self.waiting = Gauge(
            "cake_compute_requests_waiting",
            "Requests accepted but waiting for KV memory (CAKE_MAX_WAITING at most)",
            registry=r,
        )
        self.kv_reserved = Gauge(
            "cake_compute_kv_reserved_bytes",
            "Projected KV bytes (prompt + max_tokens) of the running requests",
            registry=r,
        )
        self.kv_budget = Gauge(
            "cake_compute_kv_budget_bytes", "KV memory budget (CAKE_KV_MEMORY_GB)", registry=r
        )
        self.refused = Counter(
            "cake_compute_admissions_refused",
            "Requests refused: overloaded (queue full, 429) or too_large (never fits, 400)",
            ("reason",),
            registry=r,
        )
        self.pool_bytes = Gauge(
            "cake_compute_memory_tier_bytes",
            "Bytes of prompt-chunk KV kept in the memory tier (within the KV budget's free part)",
            registry=r,
        )
        self.pool_chunks = Gauge(
            "cake_compute_memory_tier_chunks", "Prompt chunks kept in the memory tier", registry=r
        )
        self.reused = Counter(
            "cake_compute_reused_chunks",
            "Prompt chunks taken from the memory tier instead of computed or loaded",
            registry=r,
        )
        self.placed = Counter(
            "cake_compute_loaded_chunks",
            "Loaded chunks copied into their slots, by when: on_arrival (overlapping the loads) "
            "or at_merge (after the meeting point)",
            ("placed",),
            registry=r,
        )
        for when in ("on_arrival", "at_merge"):
            self.placed.labels(placed=when)
        self.went_on_alone = Counter(
            "cake_compute_went_on_alone",
            "Requests that waited for the merger past its own bounds and went on without it, by "
            "what compute decided: computes_head (loads that reached the head need no word)",
            ("decided",),
            registry=r,
        )
        self.went_on_alone.labels(decided="computes_head")
        self.heads_waiting = Gauge(
            "cake_compute_heads_waiting_for_loads",
            "Cake heads that wait for their loads rather than step, at the last step: the loads "
            "are due before a one-chunk step would end",
            registry=r,
        )
        self.chunk_step = Gauge(
            "cake_compute_chunk_step_seconds",
            "What a step of one chunk of prompt work costs, as measured (0: none ran yet)",
            registry=r,
        )
        self.evicted = Counter(
            "cake_compute_evicted_chunks",
            "Chunks evicted from the memory tier (least recently used first) for running requests",
            registry=r,
        )
        for kind in KINDS.values():  # every kind shows from the start, at 0
            self.step_tokens.labels(kind=kind)
            self.tokens.labels(kind=kind)

    def watch_admission(self, admission: Admission) -> None:
        """Export the admission state: waiting requests, reserved and budgeted KV bytes."""
        self.waiting.set_function(lambda: len(admission.waiting))
        self.kv_reserved.set_function(lambda: admission.reserved_bytes)
        self.kv_budget.set(admission.budget_bytes)
        for reason in (ErrorCode.OVERLOADED, ErrorCode.TOO_LARGE):
            self.refused.labels(reason=reason)

    def watch_pool(self, pool: PrefixPool) -> None:
        """Export the memory tier's size."""
        self.pool_bytes.set_function(lambda: pool.bytes)
        self.pool_chunks.set_function(lambda: len(pool))

    def planned(self, candidates: Sequence[Candidate], step: Sequence[Piece]) -> None:
        """The scheduler chose `step` among `candidates` (the step's tokens, if any, count)."""
        runnable = sum(1 for c in candidates if c.phase in KINDS)
        self.queue_depth.set(runnable - len(step))
        if not step:
            return
        by_kind = dict.fromkeys(KINDS.values(), 0)
        for piece in step:
            by_kind[KINDS[piece.phase]] += piece.tokens
        for kind, tokens in by_kind.items():
            self.step_tokens.labels(kind=kind).set(tokens)
            self.tokens.labels(kind=kind).inc(tokens)
