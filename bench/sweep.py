"""The benchmark sweep: calibrate, then every (context, io_ratio) cell with every mode."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from bench.client import Timing, first_token, prompt_text
from bench.profile import Profile, best_split, measure_profile
from bench.scratch import scratch
from services.launcher.in_process import generate, in_process
from services.launcher.nats_server import free_port
from services.launcher.stack import LocalStack
from shared.core.keys import KeySpace, PromptChunks
from shared.core.plan import usable_hit_chunks
from shared.core.request import KvMode
from shared.kv.model import ModelRunner
from shared.kv.tokenizer import ByteTokenizer
from shared.runtime.config import Settings
from shared.storage.local import LocalStore
from shared.storage.throttled import ThrottledStore
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import ChunkComputed, ChunkLoaded, Message

MODES = (KvMode.COMPUTE, KvMode.LOAD, KvMode.CAKE)
SPLIT_WINDOW = 4  # the measured best split tries meeting points this close to the oracle's
CHEAP_S = 1.0  # a cell takes as many Cake and load-only samples as fit in this much loading
CHEAP_REPS = 5  # ... up to this many


@dataclass(frozen=True)
class BenchConfig:
    """What to measure."""

    contexts: Sequence[int] = (2048, 4096, 8192)
    io_ratios: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0, 16.0)  # 16: near the loader's ceiling
    reps: int = 3
    fetch_concurrencies: Sequence[int] = (1, 4)
    chunk_tokens: int = 128  # the paper's I/O chunk; compute steps are 512 tokens
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"

    @classmethod
    def quick(cls) -> BenchConfig:
        """Small enough for about 5 minutes on 2 CPU cores."""
        return cls(contexts=(2048, 4096), reps=1, fetch_concurrencies=(4,))


def cell_reps(reps: int, compute_s: float, io_ratio: float) -> int:
    """Timed Cake and load-only requests in a cell: `reps`, or more (up to CHEAP_REPS) where
    as many load-only requests, expected to take compute_s / io_ratio each, fit in CHEAP_S.
    On such fast links Cake runs load-only plans: one sample of each of two modes doing the
    same work would compare their noise, not the modes."""
    return max(reps, min(CHEAP_REPS, int(CHEAP_S * io_ratio / compute_s)))


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def evict_page_cache(root: Path) -> None:
    """Ask the kernel to drop the store's files from the page cache, so reads hit the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


@dataclass
class Context:
    """One context length's prompt, its stored prefix and its measured profile."""

    tokens: int
    text: str
    salt: str
    hit: int
    kv_bytes: int
    compute_s: dict[str, list[float]] = field(default_factory=dict)
    profile: Profile | None = None

    @property
    def compute_best_s(self) -> float:
        """Compute-only TTFT at its fastest setting (best median of chunked and one-shot)."""
        return min(statistics.median(v) for v in self.compute_s.values())

    @property
    def kv_rate_mbps(self) -> float:
        """The compute side's KV-equivalent rate: KV bytes of the prompt / prefill time."""
        return self.kv_bytes / 1e6 / self.compute_best_s


class Bench:
    """Runs the sweep against a local stack it starts (and always stops)."""

    def __init__(self, config: BenchConfig, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.settings = Settings.from_env(
            store=str(workdir / "store"), staging_dir=str(workdir / "staging"),
            port=free_port(), metrics_port=0,  # no metrics servers: nothing here scrapes them
            chunk_tokens=config.chunk_tokens, model=config.model,
            dtype=config.dtype, device=config.device, request_timeout_s=900.0,
            fetch_timeout_s=120.0, log_format="json", log_level="warning",
            token_budget=max(config.contexts) + config.chunk_tokens,
            memory_tier=False,  # the sweep times storage against compute, not compute's memory
        )  # fmt: skip
        self.stack = LocalStack(self.settings)
        self.runner: ModelRunner | None = None
        self.store: LocalStore | None = None  # the stack's store, read directly by the profiles
        self.timeline: list[dict[str, Any]] = []

    async def request(self, ctx: Context, mode: KvMode, salt: str | None = None) -> Timing:
        """One timed request (the store's pages dropped from the cache first)."""
        evict_page_cache(self.workdir / "store")
        return await first_token(self.session, self.stack.url, ctx.text, mode, salt or ctx.salt)

    async def run(self) -> dict[str, Any]:
        """Calibrate, sweep, profile; the results."""
        await asyncio.to_thread(self.stack.start, token_budget=self.config.chunk_tokens)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as s:
                self.session = s
                contexts = await self.calibrate()
                return await self.sweep(contexts)
        finally:
            await asyncio.to_thread(self.stack.close)

    async def calibrate(self) -> list[Context]:
        """Compute-only TTFT chunked (budget = one chunk), then one-shot; store each prefix."""
        runner = self.runner = await asyncio.to_thread(
            ModelRunner.load, self.config.model, self.config.dtype, self.config.device
        )
        per_token = runner.layout.layers * 2 * runner.layout.kv_heads * runner.layout.head_dim
        per_token *= runner.dtype.itemsize
        contexts = []
        for n in self.config.contexts:
            salt = f"bench-{uuid.uuid4().hex[:8]}"
            hit = usable_hit_chunks(n, n, self.config.chunk_tokens)
            contexts.append(Context(n, prompt_text(n, seed=n), salt, hit, n * per_token))
        warm = 1024  # warms both pipelines of the overhead comparison alike (pipeline_overhead)
        hit = usable_hit_chunks(warm, warm, self.config.chunk_tokens)
        self.warmup = Context(warm, prompt_text(warm, seed=warm), "warm-up", hit, warm * per_token)
        for setting in ("chunked", "one-shot"):
            if setting == "one-shot":
                budget = self.settings.token_budget
                await asyncio.to_thread(self.stack.restart, "compute", token_budget=budget)
            for ctx in contexts:
                await self.request(ctx, KvMode.COMPUTE, salt=uuid.uuid4().hex)  # warm-up
                runs = [await self.request(ctx, KvMode.COMPUTE, salt=uuid.uuid4().hex)
                        for _ in range(self.config.reps)]  # fmt: skip
                ctx.compute_s[setting] = [t.ttft_s for t in runs]
        for ctx in [*contexts, self.warmup]:  # store the prefixes the timed requests hit
            await self.request(ctx, KvMode.COMPUTE)
        return contexts

    async def sweep(self, contexts: list[Context]) -> dict[str, Any]:
        """Every cell: load-only at its best concurrency, Cake, and the oracle."""
        rows = []
        cells = [(c, r) for c in contexts for r in self.config.io_ratios]
        store = self.store = LocalStore(self.settings.store)
        await store.start()
        fixed_s = await self.fixed_overhead()
        for ctx in contexts:
            ctx.profile = await self.profile(ctx, store)
        progress = tqdm(total=len(cells), desc="cake bench", unit="cell")
        for ctx, ratio in cells:
            bandwidth = ratio * ctx.kv_rate_mbps
            rows.append(await self.cell(ctx, ratio, bandwidth, fixed_s))
            progress.update()
        progress.close()
        overhead = await self.pipeline_overhead(contexts[-1], store)
        for (ctx, ratio), row in zip(cells, rows, strict=True):  # after the overhead: these
            if ratio == 1.0:  # runs warm this process, which the in-process baseline runs in
                row.update(await self.best_split(ctx, row, fixed_s))
        await store.close()
        return {"rows": rows, "pipeline": overhead, "fixed_overhead_s": fixed_s,
                "calibration": [self.calibration_row(c) for c in contexts]}  # fmt: skip

    async def profile(self, ctx: Context, store: LocalStore) -> Profile:
        """Per-chunk compute and read costs of this context in the benchmark process."""
        assert self.runner is not None
        await measure_profile(self.runner, store, self.prompt(ctx), ctx.hit)  # warm-up
        evict_page_cache(self.workdir / "store")
        return await measure_profile(self.runner, store, self.prompt(ctx), ctx.hit)

    def prompt(self, ctx: Context) -> PromptChunks:
        """The keyed prompt of a context (as the services key it)."""
        assert self.runner is not None
        space = KeySpace(
            self.runner.fingerprint, self.runner.layout, self.config.chunk_tokens, ctx.salt
        )
        return PromptChunks.of(space, ByteTokenizer().encode(ctx.text))

    async def fixed_overhead(self) -> float:
        """Pipeline cost that no split avoids: TTFT of an 8-token prompt, compute-only."""
        tiny = Context(8, prompt_text(8, seed=1), "tiny", 0, 0)
        runs = [await self.request(tiny, KvMode.COMPUTE, salt=uuid.uuid4().hex) for _ in range(3)]
        return min(t.ttft_s for t in runs)

    async def cell(
        self, ctx: Context, ratio: float, bandwidth: float, fixed_s: float
    ) -> dict[str, Any]:
        """One (context, io_ratio) cell. Cake goes first, on a merger and a loader started for
        the cell, so nothing has told it this link but what they measure when they start (no
        warm-up request); then, repetition by repetition, load-only at the loader's
        concurrency and, in the last --reps repetitions, compute-only (it writes a fresh
        prompt back, which slows the request after it); then load-only at any other
        concurrency."""
        cake: list[Timing] = []
        compute: list[float] = []
        running = self.settings.fetch_concurrency
        load_by_conc: dict[int, list[float]] = {}  # the loader's concurrency first, if tried
        if running in self.config.fetch_concurrencies:
            load_by_conc[running] = []
        await self.fresh_merger_and_loader(bandwidth, running)
        reps = cell_reps(self.config.reps, ctx.compute_best_s, ratio)
        for rep in range(reps):  # the modes side by side: they share the machine's moods
            cake.append(await self.request(ctx, KvMode.CAKE))
            for loads in load_by_conc.values():
                loads.append((await self.request(ctx, KvMode.LOAD)).ttft_s)
            if rep >= reps - self.config.reps:  # the last: its write-back slows the next one
                salt = uuid.uuid4().hex  # (it does not depend on the link: --reps of it)
                compute.append((await self.request(ctx, KvMode.COMPUTE, salt=salt)).ttft_s)
        if ratio == 1.0 and ctx.tokens == max(self.config.contexts):
            self.timeline = await self.record_timeline(ctx)
        for conc in self.config.fetch_concurrencies:
            if conc not in load_by_conc:
                await self.restart_loader(bandwidth, conc)
                load_by_conc[conc] = [
                    (await self.request(ctx, KvMode.LOAD)).ttft_s for _ in range(reps)
                ]
        best_conc = min(load_by_conc, key=lambda c: statistics.median(load_by_conc[c]))
        assert ctx.profile is not None
        load_median = statistics.median(load_by_conc[best_conc])
        latency = ctx.profile.load_latency(load_median, bandwidth, fixed_s)
        oracle_meet, oracle_s = ctx.profile.oracle(bandwidth, best_conc, fixed_s, latency)
        compute_stats = stats(compute)
        compute_best = min(compute_stats["median"], ctx.compute_best_s)
        return {
            "context": ctx.tokens,
            "io_ratio": ratio,
            "bandwidth_MBps": round(bandwidth, 2),
            "ttft_s": {
                "compute": compute_best,
                "load": load_median,
                "cake": statistics.median(t.ttft_s for t in cake),
                "oracle": oracle_s,
            },
            "ttft_stats": {
                "compute": compute_stats,
                "load": stats(load_by_conc[best_conc]),
                "cake": stats([t.ttft_s for t in cake]),
            },
            "load_concurrency": best_conc,
            "reps": reps,
            "meet_chunk": int(statistics.median(t.cake["meet_chunk"] for t in cake)),
            "oracle_meet_chunk": oracle_meet,
            "load_latency_s": round(latency, 4),
            "chunks": ctx.hit,
        }

    async def best_split(self, ctx: Context, row: dict[str, Any], fixed_s: float) -> dict[str, Any]:
        """The measured best split of a cell (bench.profile.best_split) on its link and load
        concurrency: every meeting point within SPLIT_WINDOW chunks of the model oracle's, and
        both ends, each plus the fixed cost; the row's fields for it."""
        assert self.runner is not None and self.store is not None
        around = row["oracle_meet_chunk"]
        window = range(max(0, around - SPLIT_WINDOW), min(ctx.hit, around + SPLIT_WINDOW) + 1)
        async with ThrottledStore(self.store, bandwidth_MBps=row["bandwidth_MBps"]) as link:
            meet, seconds, tried = await best_split(
                self.runner, link, self.prompt(ctx), ctx.hit, [0, ctx.hit, *window],
                row["load_concurrency"], lambda: evict_page_cache(self.workdir / "store"),
            )  # fmt: skip
        return {
            "best_split_s": seconds + fixed_s, "best_split_meet_chunk": meet,
            "best_split_tried_s": {m: round(t + fixed_s, 4) for m, t in tried.items()},
        }  # fmt: skip

    async def restart_loader(self, bandwidth: float, concurrency: int) -> None:
        """A loader on a link of `bandwidth` MB/s (it probes its store as it starts: no
        warm-up load, which would tell the estimator the link before Cake is timed)."""
        await asyncio.to_thread(self.stack.restart, "loader", **self.link(bandwidth, concurrency))

    async def fresh_merger_and_loader(self, bandwidth: float, concurrency: int) -> None:
        """A merger that has heard nothing, and a loader on a link of `bandwidth` MB/s, both
        started after the old ones stopped: the new merger hears nothing of the last link."""
        loader = self.link(bandwidth, concurrency)
        await asyncio.to_thread(self.stack.restart_each, {"merger": {}, "loader": loader})

    @staticmethod
    def link(bandwidth: float, concurrency: int) -> dict[str, Any]:
        """The loader's settings for a link of `bandwidth` MB/s read `concurrency` at a time."""
        return {"store_bandwidth_mbps": bandwidth, "fetch_concurrency": concurrency}

    async def record_timeline(self, ctx: Context) -> list[dict[str, Any]]:
        """The computed and loaded events of one Cake request, with their times."""
        bus = await Bus.connect(self.stack.nats_url_for("observer"), "cake-bench")
        events: list[dict[str, Any]] = []
        start = time.perf_counter()

        async def on_event(event: Message, _: str) -> None:
            at = time.perf_counter() - start
            if isinstance(event, ChunkComputed):
                events.append({"t": at, "kind": "computed", "upto": event.upto})
            elif isinstance(event, ChunkLoaded):
                events.append({"t": at, "kind": "loaded", "index": event.index})

        await bus.handle(subjects.EVENTS_ALL, on_event)
        evict_page_cache(self.workdir / "store")
        start = time.perf_counter()
        timing = await first_token(self.session, self.stack.url, ctx.text, KvMode.CAKE, ctx.salt)
        await bus.close()
        events.append(
            {"t": timing.ttft_s, "kind": "first_token", "meet": timing.cake["meet_chunk"]}
        )
        return events

    async def pipeline_overhead(self, ctx: Context, store: LocalStore) -> dict[str, Any]:
        """TTFT of the same Cake request through the deployed services and through the same
        services in one process (services.launcher.in_process: same model, store, link and
        settings, warmed up alike): the ratio is what NATS and the process boundaries cost."""
        assert self.runner is not None
        bandwidth = ctx.kv_rate_mbps
        concurrency = self.config.fetch_concurrencies[-1]
        await self.fresh_merger_and_loader(bandwidth, concurrency)  # as the in-process one
        await self.request(self.warmup, KvMode.CAKE)
        settings = self.settings.replace(
            fetch_concurrency=concurrency, node="in-process",
            staging_dir=str(self.workdir / "staging-in-process"),
        )  # fmt: skip
        ids = ByteTokenizer().encode
        services: list[float] = []
        local: list[float] = []
        async with (
            ThrottledStore(store, bandwidth_MBps=bandwidth) as link,
            in_process(settings, self.runner, link) as client,
        ):
            warmup = ids(self.warmup.text)
            await generate(client, settings, warmup, "cake", self.warmup.salt, max_tokens=1)
            for _ in range(max(2, self.config.reps)):
                services.append((await self.request(ctx, KvMode.CAKE)).ttft_s)
                evict_page_cache(self.workdir / "store")
                result = await generate(client, settings, ids(ctx.text), "cake", ctx.salt, 1)
                assert result.first_token_s is not None, result.end
                local.append(result.first_token_s)
        return {
            "context": ctx.tokens, "io_ratio": 1.0,
            "services_ttft_s": stats(services), "in_process_ttft_s": stats(local),
            "ratio": statistics.median(services) / statistics.median(local),
        }  # fmt: skip

    def calibration_row(self, ctx: Context) -> dict[str, Any]:
        """What calibration measured for one context."""
        return {
            "context": ctx.tokens,
            "kv_bytes": ctx.kv_bytes,
            "compute_ttft_s": {k: stats(v) for k, v in ctx.compute_s.items()},
            "kv_rate_MBps": round(ctx.kv_rate_mbps, 2),
            "profile_head_s": ctx.profile.head_s if ctx.profile else [],
        }


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark in a scratch directory."""
    with scratch("cake-bench-") as tmp:
        bench = Bench(config, Path(tmp))
        results = await bench.run()
        results["timeline"] = bench.timeline
        return results
