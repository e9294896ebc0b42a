"""The gateway's metric families: answered requests and the backend's Telemetry."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from services.gateway.errors import ApiError
from shared.core.errors import ErrorCode, http_status
from shared.core.request import KvMode
from shared.runtime.metrics import Registry
from shared.wire.messages import Done, Telemetry

log = structlog.get_logger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LEVEL_SUFFIXES = ("_bytes", "_per_s", "_ratio")  # Telemetry keys that are levels, not counts


@dataclass
class Outcome:
    """What became of one request, for metrics, the log line and the span."""

    kv_mode: str = "unknown"
    status: int = 200
    error: str | None = None  # the error kind (cake_errors_total), None on success
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    done: Done | None = None

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
    """The gateway's metric families, and the values mirrored from Telemetry messages."""

    def __init__(self, registry: Registry | None = None) -> None:
        r = self.registry = registry or Registry()
        self.requests = r.counter(
            "cake_requests_total",
            "Completion requests answered, by kv_mode and HTTP status",
            ("kv_mode", "status"),
        )
        self.ttft = r.histogram(
            "cake_ttft_seconds",
            "Time to first token reported by the compute service",
            buckets=TTFT_BUCKETS,
        )
        self.prompt_tokens = r.counter(
            "cake_prompt_tokens_total",
            "Prompt tokens of finished requests by where their KV came from",
            ("source",),
        )
        self.lookups = r.counter(
            "cake_cache_lookups_total", "Finished requests that looked up the KV store"
        )
        self.hit_tokens = r.counter(
            "cake_cache_hit_tokens_total", "Prompt tokens found in the KV store"
        )
        self.cacheable = r.counter(
            "cake_prompt_tokens_cacheable_total",
            "Prompt tokens a full hit could have served (the hit rate's denominator)",
        )
        self.errors = r.counter("cake_errors_total", "Failed requests by kind", ("kind",))
        self.generated = r.counter(
            "cake_generated_tokens_total", "Completion tokens returned to clients"
        )

    def record(self, outcome: Outcome, chunk_tokens: int) -> None:
        """Count one answered request."""
        self.requests.inc(kv_mode=outcome.kv_mode, status=str(outcome.status))
        if outcome.error:
            self.errors.inc(kind=outcome.error)
        self.generated.inc(outcome.completion_tokens)
        if outcome.done is not None:
            self._record_done(outcome.done, outcome.kv_mode, chunk_tokens)

    def _record_done(self, done: Done, kv_mode: str, chunk_tokens: int) -> None:
        self.ttft.observe(done.ttft_ms / 1000)
        suffix = max(done.prompt_tokens - done.loaded_tokens - done.computed_tokens, 0)
        self.prompt_tokens.inc(done.loaded_tokens, source="loaded")
        self.prompt_tokens.inc(done.computed_tokens, source="computed")
        self.prompt_tokens.inc(suffix, source="suffix")
        if kv_mode != KvMode.COMPUTE:
            self.lookups.inc()
            self.hit_tokens.inc(done.hit_tokens)
            self.cacheable.inc(cacheable_tokens(done.prompt_tokens, chunk_tokens))

    def record_telemetry(self, message: Telemetry) -> None:
        """Mirror a service's counters, labelled by service and node: levels (keys ending in
        LEVEL_SUFFIXES) as gauges cake_<key>, counts as counters cake_<key>_total."""
        r, names = self.registry, ("service", "node")
        labels = {"service": message.service, "node": message.node}
        for key, value in message.counters.items():
            help_text = f"{key} as last reported in Telemetry by each service and node"
            try:
                if key.endswith(LEVEL_SUFFIXES):
                    r.gauge(f"cake_{key}", help_text, names).set(value, **labels)
                else:
                    r.counter(f"cake_{key}_total", help_text, names).set_total(value, **labels)
            except ValueError as exc:
                log.debug("telemetry value not exported", key=key, error=str(exc))
