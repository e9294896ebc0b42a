"""A tiny metrics registry rendered in the Prometheus text format (version 0.0.4).

Counters, gauges and histograms with labels; no dependency. Label values are given as keyword
arguments (``requests.inc(kv_mode="cake", status="200")``) and must name exactly the metric's
labels.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator, Sequence
from typing import ClassVar, TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]
M = TypeVar("M", bound="Metric")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, +Inf, -Inf and NaN spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample(name: str, labels: Sequence[tuple[str, str]], value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}"
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
    return f"{name}{{{inner}}} {format_value(value)}"


class Metric:
    """A named metric family with a fixed set of label names."""

    kind: ClassVar[str] = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        bad = [label for label in labels if not _LABEL.match(label) or label.startswith("__")]
        if bad or len(set(labels)) != len(labels):
            raise ValueError(f"invalid or repeated label names {list(labels)!r} for {name}")
        self.name = name
        self.help = help_text
        self.labels = tuple(labels)

    def _key(self, values: dict[str, str]) -> LabelValues:
        if set(values) != set(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        return tuple(str(values[label]) for label in self.labels)

    def _pairs(self, key: LabelValues) -> list[tuple[str, str]]:
        return list(zip(self.labels, key, strict=True))

    def samples(self) -> Iterator[str]:
        """The sample lines of this family."""
        raise NotImplementedError

    def render(self) -> str:
        """HELP and TYPE lines followed by the samples."""
        head = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        return "\n".join([*head, *self.samples()]) + "\n"


class _Valued(Metric):
    """A metric with one number per label combination."""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[LabelValues, float] = {} if labels else {(): 0.0}

    def value(self, **labels: str) -> float:
        """The current value for these labels (0 when never touched)."""
        return self._values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        """One line per label combination, sorted by label values."""
        for key in sorted(self._values):
            yield _sample(self.name, self._pairs(key), self._values[key])


class Counter(_Valued):
    """A number that only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, /, **labels: str) -> None:
        """Add a non-negative amount."""
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot go down (inc by {amount})")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def set_total(self, total: float, /, **labels: str) -> None:
        """Mirror a count kept elsewhere (exporter style): the value becomes `total`."""
        self._values[self._key(labels)] = float(total)


class Gauge(_Valued):
    """A number that is set to its current value."""

    kind = "gauge"

    def set(self, value: float, /, **labels: str) -> None:
        """Set the value for these labels."""
        self._values[self._key(labels)] = float(value)


class Histogram(Metric):
    """Observations counted in buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if "le" in labels:
            raise ValueError(f"histogram {name} cannot have a label named 'le'")
        super().__init__(name, help_text, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"histogram {name} needs distinct finite bucket bounds")
        self.bounds = tuple(bounds)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}
        if not labels:
            self._counts[()] = [0] * (len(bounds) + 1)
            self._sums[()] = 0.0

    def observe(self, value: float, /, **labels: str) -> None:
        """Count one observation."""
        key = self._key(labels)
        counts = self._counts.setdefault(key, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sums[key] = self._sums.get(key, 0.0) + value

    def samples(self) -> Iterator[str]:
        """Cumulative _bucket lines (ending with le="+Inf"), then _sum and _count."""
        les = [repr(b) for b in self.bounds] + ["+Inf"]
        for key in sorted(self._counts):
            pairs = self._pairs(key)
            total = 0
            for le, count in zip(les, self._counts[key], strict=True):
                total += count
                yield _sample(f"{self.name}_bucket", [*pairs, ("le", le)], total)
            yield _sample(f"{self.name}_sum", pairs, self._sums[key])
            yield _sample(f"{self.name}_count", pairs, total)


class Registry:
    """The metric families of one process, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def _get(self, kind: type[M], name: str, labels: Sequence[str]) -> M | None:
        existing = self._metrics.get(name)
        if existing is None:
            return None
        if not isinstance(existing, kind) or existing.labels != tuple(labels):
            raise ValueError(f"metric {name} is already registered as another kind or labels")
        return existing

    def _register(self, metric: M) -> M:
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        """The counter of this name, created on first use."""
        return self._get(Counter, name, labels) or self._register(Counter(name, help_text, labels))

    def gauge(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Gauge:
        """The gauge of this name, created on first use."""
        return self._get(Gauge, name, labels) or self._register(Gauge(name, help_text, labels))

    def histogram(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        """The histogram of this name, created on first use."""
        return self._get(Histogram, name, labels) or self._register(
            Histogram(name, help_text, labels, buckets)
        )

    def render(self) -> str:
        """Every family in the text exposition format, in registration order."""
        return "".join(metric.render() for metric in self._metrics.values())
