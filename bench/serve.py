"""`cake bench --serve`: a local stack under open-loop Poisson arrivals of a request mix at
several rates (set relative to the measured service time), and two fixed scenarios."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from bench import scenarios
from bench.client import Stream, completion_body, stream_completion
from bench.memory import sampled_peak, status_kib
from bench.scratch import scratch
from bench.serve_stats import Record, rate_row, summarize
from bench.workload import (
    Document,
    Mix,
    Spec,
    documents,
    mean_service_s,
    poisson_arrivals,
    request_mix,
)
from services.launcher.nats_server import free_port
from services.launcher.stack import LocalStack
from shared.runtime.config import Settings


@dataclass(frozen=True)
class ServeConfig:
    """What the serving benchmark runs."""

    load_factors: Sequence[float] = (0.25, 0.5, 1.0, 2.0)  # offered rate x measured capacity
    rates: Sequence[float] | None = None  # requests/s, instead of load_factors
    requests_per_rate: int = 40
    max_arrival_s: float = 90.0  # no arrivals after this long into a rate
    documents: Sequence[int] = (1500, 2200, 3000)  # stored documents' lengths (tokens)
    mix: Mix = field(default_factory=Mix)
    fresh_tokens: int = 1500  # scenario (a): the fresh prompt
    decoders: int = 4  # scenario (a): requests decoding meanwhile
    decode_max_tokens: int = 128
    clients: int = 16  # scenario (b)
    client_prompt_tokens: int = 64
    client_max_tokens: int = 64
    reps: int = 3  # scenario (a) repetitions; timings per kind for the service time
    seed: int = 0
    nodes: int = 1  # compute+loader pairs (over 3 nats-servers when more than one)
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"

    @classmethod
    def quick(cls) -> ServeConfig:
        """Small enough for under 4 minutes on 2 CPU cores."""
        return cls(load_factors=(0.3, 0.8, 2.0), requests_per_rate=8, max_arrival_s=25.0,
                   documents=(1500, 2500), reps=2)  # fmt: skip


class ServeBench:
    """Runs the serving benchmark against a local stack it starts (and always stops)."""

    def __init__(self, config: ServeConfig, workdir: Path) -> None:
        self.config = config
        self.settings = Settings.from_env(
            store=str(workdir / "store"), staging_dir=str(workdir / "staging"),
            port=free_port(), model=config.model, dtype=config.dtype, device=config.device,
            log_format="json", log_level="warning",
        )  # fmt: skip
        self.stack = LocalStack(self.settings, nodes=config.nodes)
        self.run_id = uuid.uuid4().hex[:8]
        self.session: aiohttp.ClientSession | None = None

    @property
    def compute_pid(self) -> int:
        """The (first node's) compute service's process id."""
        return next(p.pid for name, p in self.stack.procs.items() if name.startswith("compute"))

    async def send(self, body: dict[str, Any], first_text: asyncio.Event | None = None) -> Stream:
        """One streamed completion; refusals and failures are in the Stream."""
        assert self.session is not None
        return await stream_completion(self.session, self.stack.url, body, first_text)

    async def run(self) -> dict[str, Any]:
        """Store the documents, measure the service time, every rate, both scenarios."""
        await asyncio.to_thread(self.stack.start)
        try:
            connector = aiohttp.TCPConnector(limit=0)  # open loop: never queue in the client
            timeout = aiohttp.ClientTimeout(total=None, sock_read=self.settings.request_timeout_s)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                self.session = session
                return await self.measure()
        finally:
            await asyncio.to_thread(self.stack.close)

    async def measure(self) -> dict[str, Any]:
        """Everything, in order, on the running stack."""
        cfg = self.config
        docs = documents(list(cfg.documents), cfg.seed)
        for doc in docs:  # untimed: each document computed once and written back
            body = completion_body(doc.text, 1, doc.salt, kv_mode="compute")
            scenarios.checked(await self.send(body), "storing a document")
        calibration = await self.calibrate(docs)
        rates = sorted(cfg.rates or [f * calibration["capacity_rps"] for f in cfg.load_factors])
        rows = []
        for i, rate in enumerate(tqdm(rates, desc="cake bench --serve", unit="rate")):
            rows.append(await self.run_rate(i, rate, docs))
        async with sampled_peak(self.compute_pid) as peak_a:
            fresh = await scenarios.fresh_under_decode(
                self.send, cfg.fresh_tokens, cfg.decoders, cfg.decode_max_tokens, cfg.reps
            )
        async with sampled_peak(self.compute_pid) as peak_b:
            together = await scenarios.concurrent_clients(
                self.send, cfg.clients, cfg.client_prompt_tokens, cfg.client_max_tokens
            )
        fresh["peak_rss_mib"], together["peak_rss_mib"] = peak_a.mib, peak_b.mib
        peaks = [peak_a.mib, peak_b.mib, *(r["peak_rss_mib"] for r in rows)]
        hwm = status_kib(self.compute_pid, "VmHWM")
        found = {"fresh_under_decode": fresh, "concurrent_16": together}
        summary = summarize(rows, found, max((p for p in peaks if p is not None), default=0.0))
        summary["compute_vmhwm_mib"] = hwm / 1024 if hwm is not None else None
        summary["service_time_s"] = calibration["service_s"]
        summary["capacity_rps"] = calibration["capacity_rps"]
        return {"calibration": calibration, "rates": rows, "scenarios": found,
                "summary": summary, "settings": self.stack_settings()}  # fmt: skip

    async def calibrate(self, docs: list[Document]) -> dict[str, Any]:
        """One request alone of each kind, at the mix's mean max_tokens (after a warm-up):
        the mix's mean service time, and the capacity of a server that runs one at a time."""
        cfg = self.config
        mean_tokens = round(sum(cfg.mix.max_tokens) / 2)
        mix = dataclasses.replace(cfg.mix, max_tokens=(mean_tokens, mean_tokens))
        short_mix = dataclasses.replace(mix, long_share=0.0)
        long_mix = dataclasses.replace(mix, long_share=1.0)
        warm = request_mix(1, [], short_mix, cfg.seed + 999, f"warm-{self.run_id}")
        long = request_mix(cfg.reps, docs, long_mix, cfg.seed + 998, f"cal-{self.run_id}")
        short = request_mix(cfg.reps, [], short_mix, cfg.seed + 997, f"cal-s-{self.run_id}")
        await self.send(warm[0].body())
        times: dict[str, list[float]] = {"long": [], "short": []}
        for spec in [*long, *short]:
            stream = scenarios.checked(await self.send(spec.body()), "a calibration request")
            times[spec.kind].append(stream.end_s)
        long_s, short_s = (statistics.median(times[k]) for k in ("long", "short"))
        service = mean_service_s(long_s, short_s, cfg.mix)
        return {"long_s": long_s, "short_s": short_s, "max_tokens": mean_tokens,
                "service_s": service, "capacity_rps": 1 / service}  # fmt: skip

    async def run_rate(self, index: int, rate: float, docs: list[Document]) -> dict[str, Any]:
        """Open-loop Poisson arrivals of the mix at `rate`; its row."""
        cfg = self.config
        seed = cfg.seed * 100 + index
        arrivals = poisson_arrivals(rate, cfg.requests_per_rate, seed, cfg.max_arrival_s)
        specs = request_mix(len(arrivals), docs, cfg.mix, seed, f"r{index}-{self.run_id}")
        async with sampled_peak(self.compute_pid) as peak:
            records = await self.arrive(specs, arrivals)
        row = rate_row(records, rate, peak.mib)
        row["records"] = [dataclasses.asdict(r) for r in records]
        return row

    async def arrive(self, specs: Sequence[Spec], arrivals: Sequence[float]) -> list[Record]:
        """Send each request at its arrival time, whatever is still in flight."""
        start = time.perf_counter()

        async def one(spec: Spec, at: float) -> Record:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            sent = time.perf_counter() - start
            return Record.of(await self.send(spec.body()), spec.kind, sent)

        return list(
            await asyncio.gather(*(one(s, a) for s, a in zip(specs, arrivals, strict=True)))
        )

    def stack_settings(self) -> dict[str, Any]:
        """The serving settings that shape the results."""
        s = self.settings
        return {"chunk_tokens": s.chunk_tokens, "token_budget": s.token_budget,
                "decode_share": s.decode_share, "max_waiting": s.max_waiting,
                "kv_memory_gb": s.kv_memory_gb, "model": s.model, "dtype": s.dtype,
                "device": s.device, "nodes": self.config.nodes}  # fmt: skip


async def run_serve(config: ServeConfig) -> dict[str, Any]:
    """The serving benchmark in a scratch directory; its results."""
    with scratch("cake-serve-") as tmp:
        return await ServeBench(config, Path(tmp)).run()
