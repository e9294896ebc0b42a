"""The merger's metric families, served on its own CAKE_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from shared.core.estimator import Advice
from shared.runtime.metrics import new_registry

MEET_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# how coordinating a request ended (cake_merger_requests_total{outcome})
OUTCOMES = (
    "met",  # loads dispatched, the frontiers met
    "resumed_head",  # advised load-only, the loads fell behind their pace: compute did the head
    "stalled",  # loads dispatched, but no progress within CAKE_FETCH_TIMEOUT_S: compute took over
    "memory",  # compute's memory tier held every hit chunk: no fetch
    "no_hit",  # nothing stored (or kv_mode=compute): compute only
    "no_fetch",  # the estimator found the hit too short to split: compute took it all
    "no_loader",  # no loader answered on the compute node: compute took it all
    "failed",  # the request failed (compute unavailable, an error, the merger shut down)
    "cancelled",  # the client cancelled before the meeting point
)


def advice_kind(advice: Advice) -> str:
    """skip_head, no_fetch, hint or none (no estimate yet, or not a cake request)."""
    if not advice.compute_head:
        return "skip_head"
    if not advice.fetch:
        return "no_fetch"
    return "hint" if advice.head_hint >= 0 else "none"


class MergerMetrics:
    """Where requests met, what the estimator advised, how coordination ended."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or new_registry()
        self.meet_position = Histogram(
            "cake_merger_meet_position_ratio",
            "Meeting chunk / hit chunks of requests with a hit: 0 = every hit chunk loaded, "
            "1 = every one computed",
            buckets=MEET_BUCKETS,
            registry=r,
        )
        self.advice = Counter(
            "cake_merger_advice",
            "The estimator's advice for cake requests with a hit (skip_head, no_fetch, hint, none)",
            ("advice",),
            registry=r,
        )
        self.requests = Counter(
            "cake_merger_requests",
            f"Requests coordinated, by kv_mode and outcome ({', '.join(OUTCOMES)})",
            ("kv_mode", "outcome"),
            registry=r,
        )

    def advised(self, advice: Advice) -> None:
        """Count the advice given to one cake request with a hit."""
        self.advice.labels(advice=advice_kind(advice)).inc()

    def finished(self, kv_mode: str, outcome: str, meet: int = 0, hit: int = 0) -> None:
        """Count one coordinated request (and where it met, when it had a hit)."""
        self.requests.labels(kv_mode=kv_mode, outcome=outcome).inc()
        if hit:
            self.meet_position.observe(meet / hit)
