"""The gateway's metric families: the requests it answered."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.gateway.errors import ApiError
from shared.core.errors import ErrorCode, http_status
from shared.core.request import KvMode
from shared.runtime.metrics import new_registry
from shared.wire.messages import Done

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Outcome:
    """What became of one request, for metrics, the log line and the span."""

    kv_mode: str = "unknown"
    status: int = 200
    error: str | None = None  # the error kind (cake_errors_total), None on success
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    dones: list[Done] = field(default_factory=list)  # each prompt's, when it got that far
    started: float = field(default_factory=time.monotonic)

    def fail(self, error: ApiError) -> None:
        """The request ended with this error."""
        self.status, self.error = error.status, error.code

    def disconnected(self) -> None:
        """The client went away (499, as nginx counts it)."""
        code = ErrorCode.CLIENT_DISCONNECTED
        self.status, self.error = http_status(code), code


def cacheable_tokens(prompt_tokens: int, chunk_tokens: int) -> int:
    """Prompt tokens a full cache hit could serve: whole chunks before the last token."""
    return max(prompt_tokens - 1, 0) // chunk_tokens * chunk_tokens


class GatewayMetrics:
    """The gateway's metric families (counter names get their _total from prometheus_client)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or new_registry()
        self.requests = Counter(
            "cake_requests",
            "Completion requests answered, by kv_mode and HTTP status",
            ("kv_mode", "status"),
            registry=r,
        )
        self.retries = Counter(
            "cake_backend_retries",
            "Requests sent again because their compute replica went silent before answering",
            registry=r,
        )
        self.ttft = Histogram(
            "cake_ttft_seconds",
            "Time to first token reported by the compute service",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "cake_request_duration_seconds",
            "Seconds from a request's arrival to the end of its successful answer, by kv_mode",
            ("kv_mode",),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "cake_prompt_tokens",
            "Prompt tokens of finished requests by where their KV came from",
            ("source",),
            registry=r,
        )
        self.lookups = Counter(
            "cake_cache_lookups", "Finished requests that looked up the KV store", registry=r
        )
        self.hit_tokens = Counter(
            "cake_cache_hit_tokens", "Prompt tokens found in the KV store", registry=r
        )
        self.cacheable = Counter(
            "cake_prompt_tokens_cacheable",
            "Prompt tokens a full hit could have served (the hit rate's denominator)",
            registry=r,
        )
        self.errors = Counter("cake_errors", "Failed requests by kind", ("kind",), registry=r)
        self.generated = Counter(
            "cake_generated_tokens", "Completion tokens returned to clients", registry=r
        )

    def record(self, outcome: Outcome, chunk_tokens: int) -> None:
        """Count one answered request."""
        self.requests.labels(kv_mode=outcome.kv_mode, status=str(outcome.status)).inc()
        if outcome.error:
            self.errors.labels(kind=outcome.error).inc()
        else:
            elapsed = time.monotonic() - outcome.started
            self.duration.labels(kv_mode=outcome.kv_mode).observe(elapsed)
        self.generated.inc(outcome.completion_tokens)
        for done in outcome.dones:
            self._record_done(done, outcome.kv_mode, chunk_tokens)

    def _record_done(self, done: Done, kv_mode: str, chunk_tokens: int) -> None:
        self.ttft.observe(done.ttft_ms / 1000)
        accounted = done.loaded_tokens + done.computed_tokens + done.reused_tokens
        suffix = max(done.prompt_tokens - accounted, 0)
        self.prompt_tokens.labels(source="reused").inc(done.reused_tokens)
        self.prompt_tokens.labels(source="loaded").inc(done.loaded_tokens)
        self.prompt_tokens.labels(source="computed").inc(done.computed_tokens)
        self.prompt_tokens.labels(source="suffix").inc(suffix)
        if kv_mode != KvMode.COMPUTE:
            self.lookups.inc()
            self.hit_tokens.inc(done.hit_tokens)
            self.cacheable.inc(cacheable_tokens(done.prompt_tokens, chunk_tokens))
