"""The benchmarks' HTTP client: streamed completions through the gateway, timed per chunk."""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


def prompt_text(n_tokens: int, seed: int) -> str:
    """Text of n_tokens tokens for the byte-level tokenizer (BOS + one token per character)."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n_tokens - 1))


def completion_body(prompt: str, max_tokens: int, salt: str, **extra: Any) -> dict[str, Any]:
    """A greedy completion request (the stream flag is added when it is sent)."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "cache_salt": salt,
            **extra}  # fmt: skip


@dataclass
class Stream:
    """One streamed completion as the client saw it; times in seconds since it was sent."""

    status: int  # HTTP status; 0 when none came (connection refused, client timeout)
    first_event_s: float | None = None  # the first server-sent event of any kind
    text_s: list[float] = field(default_factory=list)  # each chunk that carried text
    end_s: float = 0.0  # the stream's end
    final: dict[str, Any] = field(default_factory=dict)  # the last chunk: usage and cake
    error: str | None = None  # the error body (a refusal, or an error event in the stream)

    @property
    def ttft_s(self) -> float | None:
        """Time to the first chunk carrying text (the first event when none carried any)."""
        return self.text_s[0] if self.text_s else self.first_event_s

    @property
    def ok(self) -> bool:
        """Answered 200 and ended with its usage, without an error."""
        return self.status == 200 and self.error is None and bool(self.final)


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    first_text: asyncio.Event | None = None,
) -> Stream:
    """POST one streamed completion and time its chunks (first_text is set at the first text);
    refusals and failures come back in the Stream, never as exceptions."""
    start = time.perf_counter()
    stream = Stream(0)
    try:
        async with session.post(f"{url}/v1/completions", json={**body, "stream": True}) as resp:
            stream.status = resp.status
            if resp.status != 200:
                stream.error = await resp.text()
            else:
                await _read_events(resp, stream, start, first_text)
    except (TimeoutError, aiohttp.ClientError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    stream.end_s = time.perf_counter() - start
    return stream


async def _read_events(
    resp: aiohttp.ClientResponse, stream: Stream, start: float, first_text: asyncio.Event | None
) -> None:
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        at = time.perf_counter() - start
        if stream.first_event_s is None:
            stream.first_event_s = at
        event = json.loads(line[5:])
        if "error" in event:
            stream.error = json.dumps(event["error"])
        elif any(choice.get("text") for choice in event.get("choices", ())):
            stream.text_s.append(at)
            if first_text is not None:
                first_text.set()
        elif event.get("usage"):
            stream.final = event


@dataclass(frozen=True)
class Timing:
    """One request's time to first token and the Cake split it reported."""

    ttft_s: float
    cake: dict[str, Any]
    prompt_tokens: int


async def first_token(
    session: aiohttp.ClientSession, url: str, prompt: str, kv_mode: str, salt: str
) -> Timing:
    """Stream one completion (one new token) and time its first streamed chunk."""
    body = completion_body(prompt, 1, salt, kv_mode=kv_mode)
    stream = await stream_completion(session, url, body)
    if stream.status != 200:
        raise RuntimeError(f"gateway answered {stream.status}: {stream.error}")
    if stream.error is not None:
        raise RuntimeError(f"request failed: {stream.error}")
    if stream.first_event_s is None or not stream.final.get("cake"):
        raise RuntimeError("the stream ended without a token or without its usage")
    final = stream.final
    return Timing(stream.first_event_s, final["cake"], int(final["usage"]["prompt_tokens"]))
