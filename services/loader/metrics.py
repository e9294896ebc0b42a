"""The loader's metric families, served on its own CAKE_METRICS_PORT.

The counter names are the ones the gateway used to mirror from the loader's Telemetry, so
dashboards keep working once they scrape the loader itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.loader.gate import ReadGate
from shared.runtime.metrics import new_registry

FETCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Levels(Collector):
    """Gauges read when scraped: staging bytes on this node, and the store's usage (only when
    the store reports one)."""

    def __init__(
        self, staging_bytes: Callable[[], int], store_bytes: Callable[[], int | None]
    ) -> None:
        self.staging_bytes, self.store_bytes = staging_bytes, store_bytes

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # families appear only when there is a value (store usage may not)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "cake_staging_bytes",
            "Bytes in this node's staging directory (loaded chunks and write-backs waiting)",
            value=self.staging_bytes(),
        )
        usage = self.store_bytes()
        if usage is not None:
            yield GaugeMetricFamily(
                "cake_store_usage_bytes", "Bytes the chunk store holds", value=usage
            )


class LoaderMetrics:
    """Lookups, chunk and byte counts by outcome, fetch latency, staging and store usage."""

    def __init__(
        self,
        staging_bytes: Callable[[], int],
        store_bytes: Callable[[], int | None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        r = self.registry = registry or new_registry()

        def counter(name: str, help_text: str) -> Counter:
            return Counter(name, help_text, registry=r)

        self.lookups = counter(
            "cake_lookups", "Lookups answered (stored prefixes; for compute-only write-backs too)"
        )
        self.chunks_loaded = counter("cake_chunks_loaded", "Chunks read, verified and staged")
        self.bytes_loaded = counter("cake_bytes_loaded", "Bytes of the chunks loaded")
        self.load_failures = counter(
            "cake_load_failures", "Chunks that could not be loaded (missing, corrupt, error, stall)"
        )
        self.corrupt_chunks = counter(
            "cake_corrupt_chunks", "Stored chunks that failed validation (deleted; also failures)"
        )
        self.chunks_stored = counter("cake_chunks_stored", "Chunks written back to the store")
        self.bytes_stored = counter("cake_bytes_stored", "Bytes of the chunks written back")
        self.store_failures = counter(
            "cake_store_failures", "Write-backs (a request's chunks) that failed"
        )
        self.tier_reads = Counter(
            "cake_tier_reads",
            "Chunk reads by the tier that served them (near: CAKE_STORE_CACHE; counted with "
            "each telemetry window)",
            ("tier",),
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "cake_chunk_fetch_seconds",
            "Seconds to read, verify and stage one chunk that loaded",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        r.register(Levels(staging_bytes, store_bytes))
        self.read_limit = Gauge(
            "cake_loader_read_limit",
            "Chunk reads this node runs at once (all requests together; moved by how fast reads "
            "come back: additive increase, multiplicative decrease)",
            registry=r,
        )
        self.reads_in_flight = Gauge(
            "cake_loader_reads_in_flight", "Chunk reads running now on this node", registry=r
        )

    def watch_reads(self, gate: ReadGate) -> None:
        """Export the node's read limit and the reads in flight."""
        self.read_limit.set_function(lambda: gate.limit.slots)
        self.reads_in_flight.set_function(lambda: gate.in_flight)
