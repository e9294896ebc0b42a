"""The benchmark's HTTP client: time to the first streamed token through the gateway."""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import dataclass
from typing import Any

import aiohttp


def prompt_text(n_tokens: int, seed: int) -> str:
    """Text of n_tokens tokens for the byte-level tokenizer (BOS + one token per character)."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n_tokens - 1))


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
    body = {
        "prompt": prompt, "max_tokens": 1, "stream": True, "temperature": 0,
        "kv_mode": kv_mode, "cache_salt": salt,
    }  # fmt: skip
    start = time.perf_counter()
    ttft = None
    final: dict[str, Any] = {}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(f"request failed: {event['error']}")
            if event.get("cake"):
                final = event
    if ttft is None or not final:
        raise RuntimeError("the stream ended without a token or without its usage")
    return Timing(ttft, final["cake"], int(final["usage"]["prompt_tokens"]))
