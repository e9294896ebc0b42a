"""`cake bench --ceiling`: how close the loader comes to the storage under it.

One long prompt is stored; then, in one run, for the local store and for S3 (moto's server):

- raw_MBps_warm / raw_MBps_cold: plain reads of the stored chunk objects, page cache warm, then
  (local only) after dropping it. Local files are read one after another with a plain `read()`
  (a new buffer per file, as any reader that keeps the bytes has); raw_readinto_MBps_warm reads
  them into one reused buffer instead (memory bandwidth more than storage: no reader that hands
  the bytes on can do it). S3 objects are fetched with the loader's concurrency (one GET at a
  time is latency-bound, not what the loader does).
- delivered_MBps: the rate the loader really delivers into compute's KV in load-only mode:
  hit bytes / (load-only TTFT - the uncached suffix's TTFT). The suffix is timed in its
  context: the same prompt with every hit chunk already in compute's memory tier, so its
  prefill attends to the whole prompt as in the load-only request (on this CPU that attention
  is most of it: 100 tokens over 8K keys take about 0.25 s). delivered_MBps_vs_suffix_alone
  subtracts the TTFT of a prompt of the suffix's tokens alone instead (the literal reading of
  issue 10, which counts that attention as loading).
- ratio = delivered / raw_MBps_warm.
- load_ttft_over_ideal_warm / _cold: load-only TTFT over what it would be were the loader as
  fast as the storage, hit bytes / raw_MBps_warm (or _cold) + the suffix's TTFT in context
  (issue 10's second target: 1.3 at most).
- s3.large_object_MBps: one 32 MiB object (a 256-token fp16 chunk of an 8B model) read by the
  loader's S3 store in one GET and in ranged parts of CAKE_S3_PART_MB (default 8) in parallel.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp

from bench.client import first_token, prompt_text
from bench.s3_server import FAKE_AWS_ENV, moto_s3_server
from bench.scratch import scratch
from bench.sweep import evict_page_cache
from services.launcher.nats_server import free_port
from services.launcher.stack import LocalStack
from shared.core.request import KvMode
from shared.runtime.config import Settings
from shared.storage import S3Store

MB = 1e6
S3_BUCKET = "cake-ceiling"
LARGE_OBJECT_BYTES = 32 << 20


@dataclass(frozen=True)
class CeilingConfig:
    """What to measure: one prompt of `tokens` tokens, each timing repeated `reps` times."""

    tokens: int = 8192 + 100  # 32 chunks of 256 and an uncached suffix of 100 tokens
    reps: int = 3
    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"


def read_files(paths: list[Path], reuse_buffer: bool = False) -> tuple[int, float]:
    """Read every file with plain read() (or into one reused buffer); bytes and seconds."""
    view, total = memoryview(bytearray(max(p.stat().st_size for p in paths))), 0
    start = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as f:
            total += f.readinto(view) if reuse_buffer else len(f.read())
    return total, time.perf_counter() - start


async def read_objects(endpoint: str, keys: list[str], concurrency: int) -> tuple[int, float]:
    """GET every object (concurrency at once); bytes read and seconds taken."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)
    total = 0
    async with aioboto3.Session().client("s3", endpoint_url=endpoint) as s3:

        async def worker() -> None:
            nonlocal total
            while not queue.empty():
                obj = await s3.get_object(Bucket=S3_BUCKET, Key=queue.get_nowait())
                body = obj["Body"]  # (entered as itself: `as` gives the raw response)
                async with body:
                    data = await body.read()
                total += len(data)  # (not `total += len(await ...)`: that loses updates)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total, time.perf_counter() - start


async def large_object_rates(endpoint: str, reps: int) -> dict[str, float]:
    """Best of reps reads of one LARGE_OBJECT_BYTES object: one GET, and ranged parts."""
    data, rates = os.urandom(LARGE_OBJECT_BYTES), {}
    for name, part_bytes in (("one_get", 0), ("ranged", Settings.from_env().s3_part_mb * 2**20)):
        async with S3Store(S3_BUCKET, "large/", endpoint, part_bytes=round(part_bytes)) as store:
            await store.put("object", data)
            seconds = []
            for _ in range(reps):
                started = time.perf_counter()
                await store.get("object")
                seconds.append(time.perf_counter() - started)
        rates[name] = round(len(data) / min(seconds) / MB, 1)
    return rates


async def s3_keys(endpoint: str) -> list[str]:
    """Every object in the benchmark's bucket."""
    async with aioboto3.Session().client("s3", endpoint_url=endpoint) as s3:
        listed = await s3.list_objects_v2(Bucket=S3_BUCKET)
        return [o["Key"] for o in listed.get("Contents", [])]


class Ceiling:
    """One stack; the prompt stored in each store; raw and delivered rates for each."""

    def __init__(self, config: CeilingConfig, workdir: Path) -> None:
        self.config, self.workdir = config, workdir
        self.settings = Settings.from_env(
            store=str(workdir / "store"), staging_dir=str(workdir / "staging"),
            port=free_port(), metrics_port=0, model=config.model, dtype=config.dtype,
            device=config.device, request_timeout_s=600.0, log_format="json",
            log_level="warning", memory_tier=False,  # the loader is measured, not compute's memory
        )  # fmt: skip
        self.stack = LocalStack(self.settings)
        self.text = prompt_text(config.tokens, seed=8)
        chunk = self.settings.chunk_tokens
        self.hit = (config.tokens - 1) // chunk
        self.suffix = self.text[self.hit * chunk - 1 :]  # the tokens after the hit (BOS is one)

    async def ttft(self, text: str, mode: KvMode, salt: str) -> float:
        """One request's time to first token, in seconds."""
        return (await first_token(self.session, self.stack.url, text, mode, salt)).ttft_s

    async def timed(self, text: str, mode: KvMode, salt: str | None = None) -> float:
        """Median TTFT of reps requests (a fresh salt for each when none is given)."""
        runs = [
            await self.ttft(text, mode, salt or uuid.uuid4().hex) for _ in range(self.config.reps)
        ]
        return statistics.median(runs)

    async def delivered(self, salt: str) -> dict[str, float]:
        """Load-only TTFT (page cache warm: a first request warms it) and the suffix's TTFT,
        in its context (from compute's memory tier, turned on for this) and alone."""
        await self.ttft(self.text, KvMode.LOAD, salt)
        load = await self.timed(self.text, KvMode.LOAD, salt)
        alone = await self.timed(self.suffix, KvMode.COMPUTE)
        await asyncio.to_thread(self.stack.restart, "compute", memory_tier=True)
        await self.ttft(self.text, KvMode.CAKE, salt)  # fills the memory tier
        in_context = await self.timed(self.text, KvMode.CAKE, salt)
        await asyncio.to_thread(self.stack.restart, "compute")
        return {"load_ttft_s": load, "suffix_ttft_s": in_context, "suffix_alone_ttft_s": alone}

    async def local(self) -> dict[str, Any]:
        """The local store: store the prompt, read its files plainly, then load it."""
        salt = "ceiling-local"
        await self.ttft(self.text, KvMode.COMPUTE, salt)  # writes the prefix back
        store = Path(self.settings.store)
        paths = sorted(p for p in store.rglob("*") if p.is_file() and len(p.name) == 64)
        nbytes, _ = read_files(paths)  # warms the page cache
        warm = min(read_files(paths)[1] for _ in range(self.config.reps))
        reused = min(read_files(paths, reuse_buffer=True)[1] for _ in range(self.config.reps))
        cold = []
        for _ in range(self.config.reps):
            evict_page_cache(store)
            cold.append(read_files(paths)[1])
        timings = await self.delivered(salt)
        result = store_result(
            nbytes, len(paths), nbytes / warm / MB, nbytes / min(cold) / MB, timings
        )
        return {**result, "raw_readinto_MBps_warm": round(nbytes / reused / MB, 1)}

    async def s3(self) -> dict[str, Any]:
        """S3 (moto's server): the same, with the loader restarted on the bucket."""
        os.environ.update({k: os.environ.get(k, v) for k, v in FAKE_AWS_ENV.items()})
        with moto_s3_server() as endpoint:
            async with aioboto3.Session().client("s3", endpoint_url=endpoint) as s3:
                await s3.create_bucket(Bucket=S3_BUCKET)
            store = f"s3://{S3_BUCKET}/kv"
            await asyncio.to_thread(self.stack.restart, "loader", store=store, s3_endpoint=endpoint)
            salt = "ceiling-s3"
            await self.ttft(self.text, KvMode.COMPUTE, salt)
            keys = await s3_keys(endpoint)
            concurrency = self.settings.fetch_concurrency
            nbytes, _ = await read_objects(endpoint, keys, concurrency)
            runs = [
                await read_objects(endpoint, keys, concurrency) for _ in range(self.config.reps)
            ]
            warm = min(seconds for _, seconds in runs)
            timings = await self.delivered(salt)
            large = await large_object_rates(endpoint, self.config.reps)
        # moto keeps objects in memory: there is no cold read to measure
        return {
            **store_result(nbytes, len(keys), nbytes / warm / MB, None, timings),
            "large_object_MBps": large,
        }

    async def run(self) -> dict[str, Any]:
        """Start the stack, measure both stores, stop it."""
        await asyncio.to_thread(self.stack.start)
        try:
            timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s)
            async with aiohttp.ClientSession(timeout=timeout) as self.session:
                local = await self.local()
                s3 = await self.s3()
        finally:
            await asyncio.to_thread(self.stack.close)
        return {**local, "s3": s3, "prompt_tokens": self.config.tokens, "hit_chunks": self.hit}


def store_result(
    nbytes: int, chunks: int, warm: float, cold: float | None, t: dict[str, float]
) -> dict[str, Any]:
    """One store's line of ceiling.json: raw rates (MB/s), bytes and chunks read, and the TTFTs
    `t` (load_ttft_s, suffix_ttft_s, suffix_alone_ttft_s)."""
    delivered, literal = (
        nbytes / (t["load_ttft_s"] - t[suffix]) / MB if t["load_ttft_s"] > t[suffix] else None
        for suffix in ("suffix_ttft_s", "suffix_alone_ttft_s")
    )
    over_ideal = {  # load-only TTFT / (bytes at the raw rate + the suffix)
        f"load_ttft_over_ideal_{name}": None if rate is None else round(
            t["load_ttft_s"] / (nbytes / MB / rate + t["suffix_ttft_s"]), 3
        )
        for name, rate in (("warm", warm), ("cold", cold))
    }  # fmt: skip
    return {
        "raw_MBps_warm": round(warm, 1),
        "raw_MBps_cold": None if cold is None else round(cold, 1),
        "delivered_MBps": None if delivered is None else round(delivered, 1),
        "ratio": None if delivered is None else round(delivered / warm, 3),
        "delivered_MBps_vs_suffix_alone": None if literal is None else round(literal, 1),
        **over_ideal,
        "bytes": nbytes,
        "chunks": chunks,
        **{k: round(v, 4) for k, v in t.items()},
    }


async def run_ceiling(config: CeilingConfig) -> dict[str, Any]:
    """The ceiling measurement in a scratch directory."""
    with scratch("cake-ceiling-") as tmp:
        return await Ceiling(config, Path(tmp)).run()
