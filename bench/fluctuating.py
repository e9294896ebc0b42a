"""`cake bench --fluctuating`: Cake on a link that follows a repeating trace while compute is
disturbed for part of each period (the paper's Fig. 5).

The loader's link follows CAKE_STORE_BANDWIDTH_TRACE, steps of bandwidth in units of the
compute side's KV rate, repeating every period. Each mode runs for one whole period of its own
on a freshly started merger and loader (the link's second 0 at an epoch the benchmark sets):
compute-only, load-only, Cake with its controllers, then Cake on fixed settings
(CAKE_CONTROLLERS=false).
Every mode sends its requests at the same phases of the trace, so request k of every mode meets
the same link and the same disturbance without any warm-up that tells the system the link. The
phases are even marks of the period, less any at which the slowest mode's last request could
still be running by the calibration (load-only on a slow link spans several marks), so that no
mode sends late onto another link. The disturbance is another client's compute-only prompts,
sent on a fixed schedule in a window of the period (open loop, the same seconds in every mode's
period), so that each request meets the other prompts at the same moments whatever the mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import (
    Stream,
    Timing,
    completion_body,
    first_token,
    prompt_text,
    stream_completion,
)
from bench.profile import Profile, measure_profile
from bench.report import vs_best
from bench.scratch import scratch
from bench.sweep import evict_page_cache
from services.launcher.nats_server import free_port
from services.launcher.stack import LocalStack
from shared.core.bandwidth import BandwidthTrace
from shared.core.keys import KeySpace, PromptChunks
from shared.core.plan import usable_hit_chunks
from shared.kv.model import ModelRunner
from shared.kv.tokenizer import ByteTokenizer
from shared.runtime.config import Settings
from shared.storage.local import LocalStore

MODES = ("compute", "load", "cake", "cake_static")  # cake_static: CAKE_CONTROLLERS=false
RESTART_S = 5.0  # the link's clock starts this long after a period's merger and loader restart
DISTURB_SALT = "bench-disturbance"  # background prompts are stored once, then only computed
DISTURB_SHARE = 0.5  # of compute the background prompts take (undisturbed compute-only time)
LATE_S = 0.5  # a request sent this much after its second (its mode's last one overran) is late
SLACK = 1.25  # a request's expected time times this is how long its slot is kept clear


@dataclass(frozen=True)
class FluctuatingConfig:
    """What to run: the prompt, the trace (in units of the compute KV rate) and the window."""

    context: int = 4096
    chunk_tokens: int = 128
    period_s: float = 120.0
    requests: int = 24  # marks per period; fewer are sent where slow loads take several
    link: Sequence[tuple[float, float]] = (  # (fraction of the period, bandwidth / compute rate)
        (0.0, 4.0), (1 / 6, 1.0), (2 / 6, 0.25), (3 / 6, 2.0), (4 / 6, 0.5), (5 / 6, 8.0),
    )  # fmt: skip
    disturbed: tuple[float, float] = (0.45, 0.75)  # fraction of the period with background load
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"

    @classmethod
    def quick(cls) -> FluctuatingConfig:
        """About 6 minutes on 2 CPU cores."""
        return cls(context=2048, period_s=60.0, requests=20)

    def trace(self, kv_rate_MBps: float) -> BandwidthTrace:
        """The link in MB/s for a compute side of this KV rate."""
        steps = tuple((f * self.period_s, r * kv_rate_MBps) for f, r in self.link)
        return BandwidthTrace(steps, self.period_s)

    def marks(self) -> list[float]:
        """The seconds into the period a request may be sent at: mid-way between even marks,
        so none is sent on a step of the trace."""
        gap = self.period_s / self.requests
        return [(k + 0.5) * gap for k in range(self.requests)]

    def phases(self, lasts: Callable[[float], float]) -> list[float]:
        """The marks at which requests are sent: each one unless the slowest mode's request sent
        at the last of them may still be running (`lasts(t)`: how long the slowest mode's
        request sent at second t is expected to take)."""
        phases: list[float] = []
        for mark in self.marks():
            if not phases or mark >= phases[-1] + lasts(phases[-1]):
                phases.append(mark)
        return phases

    def is_disturbed(self, phase: float) -> bool:
        """Whether compute is disturbed at this phase."""
        start, end = self.disturbed
        return start * self.period_s <= phase < end * self.period_s


@dataclass(frozen=True)
class Sent:
    """One timed request: when it was sent (seconds into the period) and what it measured."""

    phase: float
    timing: Timing


class Fluctuating:
    """Runs the benchmark against a local stack it starts (and always stops)."""

    def __init__(self, config: FluctuatingConfig, workdir: Path) -> None:
        self.config, self.workdir = config, workdir
        self.text = prompt_text(config.context, seed=config.context)
        self.salt = f"bench-{uuid.uuid4().hex[:8]}"
        self.settings = Settings.from_env(
            store=str(workdir / "store"), staging_dir=str(workdir / "staging"),
            port=free_port(), metrics_port=0, chunk_tokens=config.chunk_tokens,
            model=config.model, dtype=config.dtype, device=config.device,
            request_timeout_s=900.0, fetch_timeout_s=120.0, log_format="json",
            log_level="warning", token_budget=config.context + config.chunk_tokens,
            memory_tier=False,  # every timed request meets the link, not compute's memory
        )  # fmt: skip
        self.stack = LocalStack(self.settings)
        self.disturbance: dict[str, dict[str, int]] = {}  # per mode: the background requests

    async def run(self) -> dict[str, Any]:
        """Calibrate, run every mode for a period, compute the oracle; the results."""
        await asyncio.to_thread(self.stack.start)
        try:
            timeout = aiohttp.ClientTimeout(total=900)
            async with aiohttp.ClientSession(timeout=timeout) as self.session:
                calibration = await self.calibrate()
                trace = self.config.trace(calibration["kv_rate_MBps"])
                trace_file = self.workdir / "link.trace"
                trace_file.write_text("".join(f"{t:g} {r:.3f}\n" for t, r in trace.steps))
                every_s = calibration["disturb_every_s"]
                phases = self.config.phases(partial(slowest_s, trace, calibration))
                sent = {
                    mode: await self.period(mode, trace_file, every_s, phases) for mode in MODES
                }
        finally:
            await asyncio.to_thread(self.stack.close)
        rows = self.rows(phases, sent, trace, calibration)
        return {
            "rows": rows, "summary": summarize(rows), "calibration": calibration,
            "trace": {"steps": [list(s) for s in trace.steps], "period_s": trace.period_s},
            "disturbance": self.disturbance,
        }  # fmt: skip

    async def request(self, mode: str, text: str | None = None, salt: str | None = None) -> Timing:
        """One timed request of the benchmark's prompt (the store's pages dropped first)."""
        evict_page_cache(self.workdir / "store")
        kv_mode = "cake" if mode == "cake_static" else mode
        return await first_token(
            self.session, self.stack.url, text or self.text, kv_mode, salt or self.salt
        )

    async def calibrate(self) -> dict[str, Any]:
        """The compute side's speed undisturbed (which scales the trace and sets how often the
        disturbing client sends), the fixed cost of a tiny request, the prompt stored, and the
        per-chunk profile the oracle uses."""
        await self.request("compute", salt=uuid.uuid4().hex)  # warm-up
        compute = [(await self.request("compute", salt=uuid.uuid4().hex)).ttft_s for _ in range(3)]
        tiny = prompt_text(8, seed=1)
        fixed = min([(await self.request("compute", tiny, uuid.uuid4().hex)).ttft_s
                     for _ in range(3)])  # fmt: skip
        await self.request("compute")  # stores the prompt's chunks under its salt
        runner = await asyncio.to_thread(
            ModelRunner.load, self.config.model, self.config.dtype, self.config.device
        )
        layout = runner.layout
        space = KeySpace(runner.fingerprint, layout, self.config.chunk_tokens, self.salt)
        prompt = PromptChunks.of(space, ByteTokenizer().encode(self.text))
        hit = usable_hit_chunks(self.config.context, self.config.context, space.chunk_tokens)
        async with LocalStore(self.settings.store) as store:
            await measure_profile(runner, store, prompt, hit)  # warm-up
            evict_page_cache(self.workdir / "store")
            self.profile = await measure_profile(runner, store, prompt, hit)
        kv_bytes = self.config.context * layout.bytes_per_token
        compute_s = statistics.median(compute)
        return {
            "context": self.config.context, "chunks": hit, "kv_bytes": kv_bytes,
            "compute_ttft_s": compute_s, "fixed_overhead_s": fixed,
            "kv_rate_MBps": round(kv_bytes / 1e6 / compute_s, 2),
            "disturb_every_s": round(compute_s / DISTURB_SHARE, 3),
        }  # fmt: skip

    async def period(
        self, mode: str, trace_file: Path, disturb_every_s: float, phases: Sequence[float]
    ) -> list[Sent]:
        """One period of one mode: a fresh merger and loader (the link's clock starts at an epoch
        set just after the loader is up), the disturbance in its window, a request at each
        phase."""
        controllers = mode != "cake_static"
        epoch = time.time() + RESTART_S  # the link's second 0, the same on both clocks
        loader = {
            "controllers": controllers, "store_bandwidth_trace": str(trace_file),
            "store_bandwidth_period_s": self.config.period_s, "store_bandwidth_epoch": epoch,
        }  # fmt: skip
        await asyncio.to_thread(  # the new merger hears nothing of the last period's link
            self.stack.restart_each, {"merger": {"controllers": controllers}, "loader": loader}
        )
        start = time.perf_counter() + epoch - time.time()
        disturbance = asyncio.create_task(self.disturb(mode, start, disturb_every_s))
        sent = []
        try:
            for phase in phases:
                await asyncio.sleep(max(0.0, start + phase - time.perf_counter()))
                at = time.perf_counter() - start
                sent.append(Sent(at, await self.request(mode)))
        finally:
            disturbance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await disturbance
        return sent

    async def disturb(self, mode: str, start: float, every_s: float) -> None:
        """Take a share of compute during the window: compute-only requests of another prompt
        of the same length, one sent every `every_s` seconds from the window's start whether or
        not the last has finished (so at the same seconds in every mode's period). How many
        went out, failed (refused or broken off) and were still running at the period's end
        goes in self.disturbance[mode]."""
        begin, end = (f * self.config.period_s for f in self.config.disturbed)
        text = prompt_text(self.config.context, seed=self.config.context + 1)
        body = completion_body(text, 8, DISTURB_SALT, kv_mode="compute")
        sent: list[asyncio.Task[Stream]] = []
        try:
            for second in disturb_schedule(begin, end, every_s):
                await asyncio.sleep(max(0.0, start + second - time.perf_counter()))
                request = stream_completion(self.session, self.stack.url, body)
                sent.append(asyncio.create_task(request))
            await asyncio.gather(*sent)
        finally:
            done = [t.result() for t in sent if t.done() and not t.cancelled()]
            self.disturbance[mode] = {
                "sent": len(sent), "failed": sum(1 for s in done if s.error or s.status != 200),
                "unfinished": len(sent) - len(done),
            }  # fmt: skip
            for task in sent:
                task.cancel()

    def rows(
        self, phases: Sequence[float], sent: dict[str, list[Sent]], trace: BandwidthTrace,
        calibration: dict[str, Any],
    ) -> list[dict[str, Any]]:  # fmt: skip
        """One row per phase: each mode's TTFT, the link then, and the oracle."""
        rows = []
        for k, slot in enumerate(phases):
            cake = sent["cake"][k]
            link = trace.rate_MBps(cake.phase)
            ttft = {mode: sent[mode][k].timing.ttft_s for mode in MODES}
            meet, oracle_s = self.oracle(ttft["compute"], ttft["load"], link, calibration)
            rows.append({
                "request": k,
                "slot_s": round(slot, 3),
                "phase_s": {mode: round(sent[mode][k].phase, 3) for mode in MODES},
                "link_MBps": round(link, 2),
                "io_ratio": round(link / calibration["kv_rate_MBps"], 3),
                "disturbed": self.config.is_disturbed(cake.phase),
                "late": [m for m in MODES if sent[m][k].phase - slot > LATE_S],
                "ttft_s": {**ttft, "oracle": oracle_s},
                "meet_chunk": {m: sent[m][k].timing.cake["meet_chunk"] for m in MODES[2:]},
                "oracle_meet_chunk": meet,
            })  # fmt: skip
        return rows

    def oracle(
        self, compute_s: float, load_s: float, link_MBps: float, calibration: dict[str, Any]
    ) -> tuple[int, float]:
        """The best split predicted from the per-chunk profile, both sides as contended as this
        request's own baselines found them: compute costs scaled by its compute-only TTFT over
        the undisturbed one, loads at the link's rate when the request was sent, after the
        latency its load-only TTFT shows. A model, not a bound: the link may change mid-request."""
        scale = compute_s / calibration["compute_ttft_s"]
        p = self.profile
        scaled = Profile([h * scale for h in p.head_s], p.read_s, p.chunk_bytes, p.finish_s * scale)
        fixed = calibration["fixed_overhead_s"]
        latency = scaled.load_latency(load_s, link_MBps, fixed)
        return scaled.oracle(link_MBps, self.settings.fetch_concurrency, fixed, latency)


def slowest_s(trace: BandwidthTrace, calibration: dict[str, Any], second: float) -> float:
    """How long the slowest mode's request sent at this second of the trace is expected to take,
    with slack: compute-only undisturbed, or load-only's fixed cost and the prompt's KV over
    the link as it will be."""
    load_s = trace.transfer_end(second, calibration["kv_bytes"]) - second
    return SLACK * max(calibration["compute_ttft_s"], calibration["fixed_overhead_s"] + load_s)


def disturb_schedule(begin: float, end: float, every_s: float) -> list[float]:
    """The seconds of the period at which the disturbing client sends: every every_s from begin,
    before end."""
    return [begin + j * every_s for j in range(math.ceil((end - begin) / every_s))]


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The issue's headline numbers over all requests."""
    t = [r["ttft_s"] for r in rows]
    ratios = [vs_best(x) for x in t]
    return {
        "cake_vs_best_mean": statistics.fmean(ratios),
        "cake_vs_best_worst": min(ratios),
        "controllers_gain": statistics.fmean(x["cake_static"] for x in t)
        / statistics.fmean(x["cake"] for x in t),
        "cake_over_oracle_mean": statistics.fmean(x["cake"] / x["oracle"] for x in t),
    }


async def run_fluctuating(config: FluctuatingConfig) -> dict[str, Any]:
    """Run the benchmark in a scratch directory."""
    with scratch("cake-fluctuating-") as tmp:
        results = await Fluctuating(config, Path(tmp)).run()
    return {"config": dataclasses.asdict(config), **results}
