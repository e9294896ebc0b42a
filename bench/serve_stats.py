"""The serving benchmark's arithmetic, pure: per-request records, percentiles, one row per
arrival rate, the two fixed scenarios' ratios and the summary."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.client import Stream

TTFT_QS = (50, 90, 99)
E2E_QS = (50, 99)
FRESH_UNDER_DECODE_TARGET = 1.5  # loaded / idle TTFT, at most
CONCURRENT_TARGET = 3.0  # output tokens/s of all clients at once / one at a time, at least


@dataclass(frozen=True)
class Record:
    """One request as the client saw it (seconds)."""

    kind: str  # "long" (on a stored document) or "short" (fresh)
    arrival_s: float  # when it was sent, since its rate's start
    status: int  # HTTP status; 0: the client failed
    ttft_s: float | None  # the first chunk carrying text (or the first event, when none did)
    itl_s: tuple[float, ...]  # between consecutive chunks carrying text
    e2e_s: float  # until the stream ended
    prompt_tokens: int = 0
    completion_tokens: int = 0  # from the final usage chunk
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Answered 200 and ended with its usage, without an error event."""
        return self.status == 200 and self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None with fewer than two tokens)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)

    @property
    def end_s(self) -> float:
        """When it ended, since its rate's start."""
        return self.arrival_s + self.e2e_s

    @property
    def error_key(self) -> str:
        """How errors are counted: the HTTP status, `stream_error` (an error event after a 200)
        or `client_error` (no answer)."""
        if self.status == 0:
            return "client_error"
        return "stream_error" if self.status == 200 else str(self.status)

    @classmethod
    def of(cls, stream: Stream, kind: str, arrival_s: float) -> Record:
        """The record of one streamed request."""
        usage = stream.final.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        itl = tuple(b - a for a, b in zip(stream.text_s, stream.text_s[1:], strict=False))
        error = stream.error
        if stream.status == 200 and error is None and not stream.final:
            error = "the stream ended without its usage"
        return cls(
            kind, arrival_s, stream.status, stream.ttft_s, itl, stream.end_s,
            int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
            int(details.get("cached_tokens", 0)), error,
        )  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile, interpolated linearly between order statistics (numpy's default);
    None without values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    """{"p50": ..., ...} for the given percentiles."""
    return {f"p{q}": percentile(values, q) for q in qs}


def rate_row(
    records: Sequence[Record], offered_rps: float, peak_rss_mib: float | None = None
) -> dict[str, Any]:
    """One arrival rate: latency percentiles of the completed requests, throughput over the
    window from the first arrival to the last end, errors by kind (429s apart from failures)."""
    done = [r for r in records if r.ok]
    errors = Counter(r.error_key for r in records if not r.ok)
    rejected = errors.get("429", 0)
    window = max(r.end_s for r in records) - min(r.arrival_s for r in records) if records else 0.0
    tokens = sum(r.completion_tokens for r in done)
    last_arrival = max((r.arrival_s for r in records), default=0.0)
    return {
        "offered_rps": offered_rps,
        "arrived_rps": len(records) / last_arrival if last_arrival > 0 else None,
        "sent": len(records),
        "completed": len(done),
        "rejected_429": rejected,
        "failed": len(records) - len(done) - rejected,
        "errors": dict(sorted(errors.items())),
        "ttft_s": distribution([r.ttft_s for r in done if r.ttft_s is not None], TTFT_QS),
        "itl_s": distribution([x for r in done for x in r.itl_s], TTFT_QS),
        "e2e_s": distribution([r.e2e_s for r in done], E2E_QS),
        "tpot_s": distribution([t for r in done if (t := r.tpot_s) is not None], E2E_QS),
        "window_s": window,
        "throughput_rps": len(done) / window if window > 0 else 0.0,
        "output_tok_s": tokens / window if window > 0 else 0.0,
        "completion_tokens": tokens,
        "cached_tokens": sum(r.cached_tokens for r in done),
        "prompt_tokens": sum(r.prompt_tokens for r in done),
        "peak_rss_mib": peak_rss_mib,
    }


def fresh_under_decode(
    idle_s: Sequence[float], loaded_s: Sequence[float], **info: Any
) -> dict[str, Any]:
    """Scenario (a): TTFT of a fresh prompt while others decode over its TTFT on an idle
    server (medians of the repetitions)."""
    idle, loaded = statistics.median(idle_s), statistics.median(loaded_s)
    ratio = loaded / idle
    return {**info, "idle_ttft_s": list(idle_s), "loaded_ttft_s": list(loaded_s),
            "idle_ttft_median_s": idle, "loaded_ttft_median_s": loaded, "ratio": ratio,
            "target_max": FRESH_UNDER_DECODE_TARGET,
            "met": ratio <= FRESH_UNDER_DECODE_TARGET}  # fmt: skip


def side(tokens: int, wall_s: float, ttfts: Sequence[float]) -> dict[str, Any]:
    """One side of scenario (b): completion tokens, wall time, output tokens per second."""
    return {"completion_tokens": tokens, "wall_s": wall_s, "output_tok_s": tokens / wall_s,
            "ttft_s": distribution(ttfts, E2E_QS)}  # fmt: skip


def concurrent(together: dict[str, Any], one_by_one: dict[str, Any], **info: Any) -> dict[str, Any]:
    """Scenario (b): output-token throughput of all clients at once over one at a time."""
    ratio = together["output_tok_s"] / one_by_one["output_tok_s"]
    return {**info, "together": together, "one_by_one": one_by_one, "ratio": ratio,
            "target_min": CONCURRENT_TARGET, "met": ratio >= CONCURRENT_TARGET}  # fmt: skip


def summarize(
    rows: Sequence[dict[str, Any]], scenarios: dict[str, dict[str, Any]], peak_rss_mib: float
) -> dict[str, Any]:
    """The headline numbers: TTFT at the lightest and heaviest rate, the best throughput, the
    scenario ratios, errors and the compute process's peak memory."""
    low, high = rows[0], rows[-1]
    return {
        "ttft_p50_s_lowest_rate": low["ttft_s"]["p50"],
        "ttft_p99_s_lowest_rate": low["ttft_s"]["p99"],
        "ttft_p50_s_highest_rate": high["ttft_s"]["p50"],
        "ttft_p99_s_highest_rate": high["ttft_s"]["p99"],
        "max_throughput_rps": max(r["throughput_rps"] for r in rows),
        "max_output_tok_s": max(r["output_tok_s"] for r in rows),
        "rejected_429": sum(r["rejected_429"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "fresh_under_decode_ratio": scenarios["fresh_under_decode"]["ratio"],
        "concurrent_16_ratio": scenarios["concurrent_16"]["ratio"],
        "peak_compute_rss_mib": peak_rss_mib,
    }
