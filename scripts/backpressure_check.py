"""32 concurrent 3,000-token requests against `cake up` with a KV budget smaller than they need.

Prints how many were answered 200 and 429 (with Retry-After), and the compute process's memory
with the model loaded and at its peak. From the repository root:
`python scripts/backpressure_check.py` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

PORT, REQUESTS, PROMPT_TOKENS, MAX_TOKENS, BUDGET_GB, MAX_WAITING = 8731, 32, 3000, 16, 0.5, 8
URL = f"http://127.0.0.1:{PORT}"


def start_stack() -> subprocess.Popen[str]:
    """`cake up` with the budget, on scratch directories, quiet."""
    env = dict(os.environ, CAKE_LOG_LEVEL="warning", CAKE_METRICS_PORT="0")
    command = [
        sys.executable, "-m", "services.launcher.cli", "up", "--port", str(PORT),
        "--kv-memory-gb", str(BUDGET_GB), "--max-waiting", str(MAX_WAITING),
        "--store", "/tmp/cake-bp-store", "--staging-dir", "/tmp/cake-bp-staging",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env, text=True, start_new_session=True)


def compute_pid() -> int:
    found = subprocess.run(
        ["pgrep", "-f", "services.launcher.cli serve compute"], capture_output=True, text=True
    )
    return int(found.stdout.split()[0])


def peak_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM)."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


async def ask(http: aiohttp.ClientSession, i: int) -> tuple[int, str | None, dict[str, Any]]:
    rng = random.Random(i)
    text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(PROMPT_TOKENS - 1))
    body = {"prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0, "cache_salt": f"s{i}"}
    async with http.post(f"{URL}/v1/completions", json=body) as resp:
        return resp.status, resp.headers.get("Retry-After"), await resp.json()


async def main() -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        for _ in range(600):  # until compute has told the gateway its model
            try:
                async with http.get(f"{URL}/v1/models") as resp:
                    if resp.status == 200 and (await resp.json())["data"][0]["max_model_len"]:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        pid = compute_pid()
        idle = peak_mib(pid)
        start = time.perf_counter()
        answers = await asyncio.gather(*(ask(http, i) for i in range(REQUESTS)))
        wall = time.perf_counter() - start
    statuses: dict[int, int] = {}
    for status, _, _ in answers:
        statuses[status] = statuses.get(status, 0) + 1
    retry = [after for status, after, _ in answers if status == 429]
    tokens = [body["usage"]["completion_tokens"] for status, _, body in answers if status == 200]
    return {
        "statuses": statuses, "every_429_has_retry_after": all(retry), "retry_after": retry[:3],
        "completed": len(tokens), "completion_tokens": sorted(set(tokens)),
        "wall_s": round(wall, 1), "compute_idle_mib": round(idle),
        "compute_peak_mib": round(peak_mib(pid)), "kv_budget_mib": BUDGET_GB * 1024,
    }  # fmt: skip


if __name__ == "__main__":
    stack = start_stack()
    try:
        print(json.dumps(asyncio.run(main()), indent=1))
    finally:
        os.killpg(stack.pid, signal.SIGINT)
        stack.wait(60)
