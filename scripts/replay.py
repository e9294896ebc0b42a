"""Replays behind the notes in docs/benchmarks.md: one local stack, one situation, the
computed and loaded events of the requests that matter.

    python scripts/replay.py link-step   # link 4x for 20 s, then 1x: controllers vs fixed
    python scripts/replay.py link-rise   # link 0.5x for 20 s, then 8x: the first requests after
    python scripts/replay.py rise-mid    # link 0.5x, a request sent 0.5 s before it rises 16x
    python scripts/replay.py idle-rise   # link 0.5x, rises 16x while idle: link probe on, off
    python scripts/replay.py link-drop   # a load-only request whose link drops 10x mid-request
    python scripts/replay.py disturbed [--budget N] [--link X]  # link 2x, compute kept busy
    python scripts/replay.py fast-first  # a fresh merger's first request at io_ratio 16
    python scripts/replay.py memory-on   # stored prompts, compute's memory tier on: Cake TTFT
    python scripts/replay.py balance [--tokens N]  # at io_ratio 1: where a Cake request's time goes

Run from the repository root with nothing else running (timings). Link speeds are in units of
the compute side's KV rate, calibrated first, as in `cake bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import completion_body, first_token, prompt_text, stream_completion
from bench.sweep import Bench, BenchConfig, Context, evict_page_cache
from shared.core.request import KvMode


@contextlib.asynccontextmanager
async def calibrated(tokens: int, budget: int) -> AsyncIterator[tuple[Bench, Context]]:
    """A started stack whose compute runs `budget` tokens a step, with a stored prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(BenchConfig(contexts=(tokens,), io_ratios=(1.0,), reps=1), Path(tmp))
        await asyncio.to_thread(bench.stack.start, token_budget=budget)
        try:
            async with aiohttp.ClientSession() as session:
                bench.session = session
                ctx = (await bench.calibrate())[0]
                await asyncio.to_thread(bench.stack.restart, "compute", token_budget=budget)
                print(f"compute KV rate {ctx.kv_rate_mbps:.1f} MB/s", flush=True)
                yield bench, ctx
        finally:
            await asyncio.to_thread(bench.stack.close)


async def restart(bench: Bench, controllers: bool = True, **loader: Any) -> None:
    """A fresh merger and loader (the loader's link and settings as given), started after the
    old ones stopped: the new merger hears nothing of the last link."""
    loader = {"controllers": controllers, **loader}
    await asyncio.to_thread(
        bench.stack.restart_each, {"merger": {"controllers": controllers}, "loader": loader}
    )


async def on_trace(bench: Bench, steps: str, controllers: bool = True, **loader: Any) -> float:
    """A fresh merger and loader, the loader on a link trace ("t MBps" lines) whose second 0
    is a few seconds from now (and its other settings as given); that moment on the
    perf_counter clock."""
    trace = bench.workdir / "link.trace"
    trace.write_text(steps)
    epoch = time.time() + 5
    await restart(
        bench, controllers, store_bandwidth_trace=str(trace), store_bandwidth_period_s=1000.0,
        store_bandwidth_epoch=epoch, **loader,
    )  # fmt: skip
    return time.perf_counter() + epoch - time.time()


async def taught(
    bench: Bench, ctx: Context, before: float, after: float, teach_at: tuple[float, ...],
    controllers: bool = True, **loader: Any,
) -> float:  # fmt: skip
    """A fresh merger and loader (the loader's other settings as given) on a link at `before` x
    the compute rate that steps to `after` x at second 20, and Cake requests at the seconds
    `teach_at` that teach the estimate the first link; second 0 on the perf_counter clock."""
    rate = ctx.kv_rate_mbps
    steps = f"0 {before * rate:.3f}\n20 {after * rate:.3f}\n"
    start = await on_trace(bench, steps, controllers, **loader)
    for second in teach_at:
        await at(start, second)
        await bench.request(ctx, KvMode.CAKE)
    return start


async def at(start: float, second: float) -> None:
    """Sleep until `second` seconds after start."""
    await asyncio.sleep(max(0.0, start + second - time.perf_counter()))


async def traced(bench: Bench, ctx: Context, label: str) -> float:
    """One Cake request with its events printed; its TTFT."""
    events = await bench.record_timeline(ctx)
    computed = [(round(e["t"], 3), e["upto"]) for e in events if e["kind"] == "computed"]
    loaded = [(round(e["t"], 3), e["index"]) for e in events if e["kind"] == "loaded"]
    end = events[-1]
    print(f"{label}: ttft {end['t']:.3f} s, meet {end['meet']}\n  computed (s, upto) {computed}"
          f"\n  loaded (s, chunk) {loaded}", flush=True)  # fmt: skip
    return float(end["t"])


async def link_step() -> None:
    """Requests at 4x teach the estimate load-only; the link steps to 1x at second 20; three
    Cake requests after it, with controllers and then on fixed settings, two rounds."""
    async with calibrated(2048, 2048 + 128) as (bench, ctx):
        for _ in range(2):
            for controllers in (True, False):
                start = await taught(bench, ctx, 4, 1, (3.0, 6.0, 9.0), controllers)
                for second in (20.5, 23.5, 26.5):
                    await at(start, second)
                    await traced(bench, ctx, f"controllers={controllers} at {second} s")


async def link_rise() -> None:
    """Requests at 0.5x teach the estimate a slow link; the link steps to 8x at second 20; two
    traced Cake requests after it, then load-only for comparison. Three rounds."""
    async with calibrated(2048, 2048 + 128) as (bench, ctx):
        for round_ in range(3):
            start = await taught(bench, ctx, 0.5, 8, (3.0, 8.0, 13.0))
            for second in (20.5, 22.5):
                await at(start, second)
                await traced(bench, ctx, f"round {round_}, {second - 20:.1f} s after the rise")
            load = [(await bench.request(ctx, KvMode.LOAD)).ttft_s for _ in range(2)]
            print(f"  load-only after them {[round(t, 3) for t in load]}", flush=True)


async def rise_mid() -> None:
    """Requests at 0.5x teach the estimate a slow link; the next is sent 0.5 s before the link
    rises to 8x: Cake with controllers, on fixed settings, then load-only. Two rounds."""
    async with calibrated(2048, 2048 + 128) as (bench, ctx):
        for round_ in range(2):
            for mode in ("controllers", "fixed", "load-only"):
                start = await taught(bench, ctx, 0.5, 8, (3.0, 8.0, 13.0), mode != "fixed")
                await at(start, 19.5)
                if mode == "load-only":
                    load = (await bench.request(ctx, KvMode.LOAD)).ttft_s
                    print(f"round {round_}, load-only {load:.3f} s", flush=True)
                else:
                    await traced(bench, ctx, f"round {round_}, {mode}")


async def idle_rise() -> None:
    """Requests at 0.5x teach the estimate a slow link; it rises to 8x at second 20 while
    nothing loads; a Cake request 2.5 s after, with the idle link probe (CAKE_LINK_PROBE_S=1)
    and without it (0), each followed by load-only. Three rounds."""
    async with calibrated(2048, 2048 + 128) as (bench, ctx):
        for round_ in range(3):
            for probe_s in (1.0, 0.0):
                start = await taught(bench, ctx, 0.5, 8, (3.0, 8.0, 13.0), link_probe_s=probe_s)
                await at(start, 22.5)
                await traced(bench, ctx, f"round {round_}, CAKE_LINK_PROBE_S={probe_s:g}")
                load = (await bench.request(ctx, KvMode.LOAD)).ttft_s
                print(f"  load-only after it {load:.3f} s", flush=True)


async def link_drop() -> None:
    """Requests at 8x teach the estimate load-only; the next is sent 0.1 s before the link
    drops to 0.8x; then compute-only for comparison. Three rounds."""
    async with calibrated(2048, 2048 + 128) as (bench, ctx):
        for round_ in range(3):
            start = await taught(bench, ctx, 8, 0.8, (4.0, 8.0, 12.0, 16.0))
            await at(start, 19.9)
            cake = await traced(bench, ctx, f"round {round_}, the link drops 10x")
            salts = (f"compute-{round_}-{i}" for i in range(2))
            compute = [(await bench.request(ctx, KvMode.COMPUTE, salt)).ttft_s for salt in salts]
            print(f"  compute-only {min(compute):.3f} s: cake / compute {cake / min(compute):.2f}")


async def disturbed(budget: int, link: float) -> None:
    """Link at `link` x (2 unless given); a client keeps compute busy with compute-only requests
    of another prompt as long; four traced Cake requests per setting (controllers, fixed), then
    two compute-only requests of the prompt under the same load; two rounds."""
    async with calibrated(2048, budget) as (bench, ctx):
        body = completion_body(prompt_text(2048, seed=99), 8, "disturbance", kv_mode="compute")
        for _ in range(2):
            for controllers in (True, False):
                await restart(bench, controllers, store_bandwidth_mbps=link * ctx.kv_rate_mbps)
                busy = asyncio.create_task(keep_busy(bench, body))
                await asyncio.sleep(3)
                for i in range(4):
                    await traced(bench, ctx, f"controllers={controllers}, request {i}")
                    await asyncio.sleep(1)
                compute = []
                for i in range(2):
                    salt = f"busy-compute-{controllers}-{i}-{time.time()}"
                    compute.append((await bench.request(ctx, KvMode.COMPUTE, salt)).ttft_s)
                    await asyncio.sleep(1)
                print(f"  compute-only under the same load {[round(t, 3) for t in compute]}")
                busy.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await busy


async def keep_busy(bench: Bench, body: dict[str, Any]) -> None:
    """Compute-only requests one after another until cancelled."""
    while True:
        await stream_completion(bench.session, bench.stack.url, body)


async def fast_first() -> None:
    """Five times: a fresh merger and loader at io_ratio 16, the first Cake request traced,
    then two load-only requests."""
    async with calibrated(4096, 4096 + 128) as (bench, ctx):
        for round_ in range(5):
            await restart(bench, store_bandwidth_mbps=16 * ctx.kv_rate_mbps)
            await traced(bench, ctx, f"round {round_}, first request")
            loads = [(await bench.request(ctx, KvMode.LOAD)).ttft_s for _ in range(2)]
            print(f"  load-only after it {[round(t, 3) for t in loads]}", flush=True)


async def balance(tokens: int) -> None:
    """Four times: a fresh merger and loader at io_ratio 1, the first and a second Cake request
    traced, then one load-only and one compute-only request."""
    async with calibrated(tokens, tokens + 128) as (bench, ctx):
        for round_ in range(4):
            await restart(bench, store_bandwidth_mbps=ctx.kv_rate_mbps)
            await traced(bench, ctx, f"round {round_}, first request")
            await traced(bench, ctx, f"round {round_}, second request")
            load = (await bench.request(ctx, KvMode.LOAD)).ttft_s
            salt = f"balance-compute-{time.time()}"
            compute = (await bench.request(ctx, KvMode.COMPUTE, salt)).ttft_s
            print(f"  load-only {load:.3f} s, compute-only {compute:.3f} s", flush=True)


async def memory_on() -> None:
    """With compute's memory tier on (the default; the benchmarks turn it off), six prompts of
    4,096 tokens stored by compute-only requests, then each once in Cake at 16x and at 1x: the
    tier fills as they run, and none of them finds its prompt there."""
    async with calibrated(4096, 2048 + 128) as (bench, ctx):
        budget = 2048 + 128
        await asyncio.to_thread(
            bench.stack.restart, "compute", token_budget=budget, memory_tier=True
        )
        for ratio in (16.0, 1.0):
            await restart(bench, store_bandwidth_mbps=ratio * ctx.kv_rate_mbps)
            texts = [prompt_text(4096, seed=1000 + k + int(ratio * 100)) for k in range(6)]
            salt = f"memory-on-{time.time()}"
            for text in texts:
                await stream_completion(bench.session, bench.stack.url, completion_body(
                    text, 1, salt, kv_mode="compute"))  # fmt: skip
            ttfts = []
            for text in texts:
                await asyncio.sleep(1)
                evict_page_cache(bench.workdir / "store")
                timing = await first_token(bench.session, bench.stack.url, text, KvMode.CAKE, salt)
                ttfts.append(timing.ttft_s)
            print(f"io_ratio {ratio:g}: Cake TTFT {[round(t, 3) for t in ttfts]}, median "
                  f"{statistics.median(ttfts):.3f} s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    choices = (
        "link-step", "link-rise", "rise-mid", "idle-rise", "link-drop", "disturbed", "fast-first",
        "memory-on", "balance",
    )  # fmt: skip
    parser.add_argument("replay", choices=choices)
    parser.add_argument("--budget", type=int, default=2048 + 128, help="disturbed: step tokens")
    parser.add_argument("--link", type=float, default=2.0, help="disturbed: x the compute rate")
    parser.add_argument("--tokens", type=int, default=2048, help="balance: prompt tokens")
    args = parser.parse_args()
    replays = {
        "link-step": link_step, "link-rise": link_rise, "rise-mid": rise_mid,
        "idle-rise": idle_rise, "link-drop": link_drop, "fast-first": fast_first,
        "memory-on": memory_on, "balance": lambda: balance(args.tokens),
        "disturbed": lambda: disturbed(args.budget, args.link),
    }  # fmt: skip
    asyncio.run(replays[args.replay]())


if __name__ == "__main__":
    main()
