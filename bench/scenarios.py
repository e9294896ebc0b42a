"""The two fixed serving scenarios the project's targets name, driven through a send function:
a fresh prompt's TTFT under decode load, and concurrent short requests' output throughput."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench import serve_stats
from bench.client import Stream, completion_body, prompt_text

Send = Callable[[dict[str, Any], asyncio.Event | None], Awaitable[Stream]]
DECODE_PROMPT_TOKENS = 64
START_TIMEOUT_S = 120.0


def fresh_salt() -> str:
    """A salt no earlier request used, so nothing of the prompt is found in the store."""
    return f"fresh-{uuid.uuid4().hex}"


def checked(stream: Stream, what: str) -> Stream:
    """The stream, or RuntimeError when it failed (a scenario needs every request)."""
    if not stream.ok or stream.ttft_s is None:
        raise RuntimeError(f"{what} failed with status {stream.status}: {stream.error}")
    return stream


def ttft(stream: Stream) -> float:
    """A checked stream's time to its first text."""
    assert stream.ttft_s is not None
    return stream.ttft_s


async def keep_decoding(
    send: Send, stop: asyncio.Event, started: asyncio.Event, max_tokens: int, seed: int
) -> int:
    """Short requests of max_tokens one after another until stop is set; how many were sent."""
    sent = 0
    while not stop.is_set():
        body = completion_body(
            prompt_text(DECODE_PROMPT_TOKENS, seed + sent), max_tokens, fresh_salt()
        )
        checked(await send(body, started), "a decoding request")
        sent += 1
    return sent


async def until_started(started: list[asyncio.Event], workers: list[asyncio.Task[int]]) -> None:
    """Until every worker has streamed text; RuntimeError if one ended first (it failed)."""
    all_started = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in started)))
    watched: list[asyncio.Future[Any]] = [all_started, *workers]
    done, _ = await asyncio.wait(
        watched, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if all_started not in done:
        all_started.cancel()
        raise RuntimeError("the decoding requests did not all start streaming")


async def fresh_under_decode(
    send: Send, prompt_tokens: int, decoders: int, decode_max_tokens: int, reps: int
) -> dict[str, Any]:
    """TTFT of a fresh prompt on the idle server, then while `decoders` short requests decode
    (each replaced by a new one when it ends, until the prompt's first token): median of reps."""
    prompt = prompt_text(prompt_tokens, seed=prompt_tokens)

    async def timed() -> float:
        body = completion_body(prompt, 1, fresh_salt())
        return ttft(checked(await send(body, None), "the fresh prompt"))

    idle = [await timed() for _ in range(reps)]
    loaded, replaced = [], 0
    for rep in range(reps):
        stop = asyncio.Event()
        started = [asyncio.Event() for _ in range(decoders)]
        workers = [
            asyncio.create_task(
                keep_decoding(
                    send, stop, started[i], decode_max_tokens, seed=10_000 * rep + 100 * i
                )
            )
            for i in range(decoders)
        ]
        try:
            await until_started(started, workers)
            loaded.append(await timed())
        finally:
            stop.set()
            counts = await asyncio.gather(*workers)
        replaced += sum(counts) - decoders
    return serve_stats.fresh_under_decode(
        idle, loaded, prompt_tokens=prompt_tokens, decoders=decoders,
        decode_max_tokens=decode_max_tokens, reps=reps, decoders_replaced=replaced,
    )  # fmt: skip


async def concurrent_clients(
    send: Send, clients: int, prompt_tokens: int, max_tokens: int
) -> dict[str, Any]:
    """Fresh short prompts from `clients` clients at once, then the same ones one at a time:
    output tokens per second of each (greedy, so both produce the same completions)."""
    prompts = [prompt_text(prompt_tokens, seed=20_000 + i) for i in range(clients)]

    def body(prompt: str) -> dict[str, Any]:
        return completion_body(prompt, max_tokens, fresh_salt())

    start = time.perf_counter()
    together = await asyncio.gather(*(send(body(p), None) for p in prompts))
    together_s = time.perf_counter() - start
    start = time.perf_counter()
    one_by_one = [await send(body(p), None) for p in prompts]
    one_by_one_s = time.perf_counter() - start
    sides = []
    for streams, wall in ((together, together_s), (one_by_one, one_by_one_s)):
        for s in streams:
            checked(s, "a concurrent client's request")
        tokens = sum(int(s.final["usage"]["completion_tokens"]) for s in streams)
        sides.append(serve_stats.side(tokens, wall, [ttft(s) for s in streams]))
    return serve_stats.concurrent(
        sides[0], sides[1], clients=clients, prompt_tokens=prompt_tokens, max_tokens=max_tokens
    )
