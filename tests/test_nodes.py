"""Several nodes, as `cake up --nodes 2` runs them: two computes and two loaders, one gateway and
merger, a cluster of three nats-servers and one S3 bucket (the test S3 server). A chunk one node
stored is loaded by the other; a node killed under load loses no request silently; a NATS server
killed is survived."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.launcher.nats_server import free_port, free_ports
from services.launcher.stack import LocalStack
from shared.runtime.config import Settings
from shared.storage.s3 import S3Store
from tests.prom import samples

REQUEST_TIMEOUT_S = 60.0


@pytest.fixture
def stack(tmp_path: Path, s3_endpoint: str) -> Iterator[LocalStack]:
    bucket = "cake-" + uuid.uuid4().hex[:12]

    async def make_bucket() -> None:
        async with S3Store(bucket, "kv/", endpoint_url=s3_endpoint) as store:
            await store.ensure_bucket()

    asyncio.run(make_bucket())
    settings = Settings(
        port=free_port(), store=f"s3://{bucket}/kv", s3_endpoint=s3_endpoint,
        staging_dir=str(tmp_path / "staging"), chunk_tokens=64, log_level="warning",
        heartbeat_s=1.0, telemetry_s=0.5, rpc_timeout_s=2.0,
        request_timeout_s=REQUEST_TIMEOUT_S,
    ).validated()  # fmt: skip
    stack = LocalStack(settings, nodes=2)
    # metrics ports (readiness: each process answers on its own) picked once the nats-servers
    # hold their route ports, so the two cannot collide
    stack.settings = stack.settings.replace(metrics_port=free_ports(5))
    try:
        stack.start()  # every process up (each answers on its metrics port)
        time.sleep(3 * settings.telemetry_s)  # and the merger has heard every node's telemetry
        yield stack
    finally:
        stack.close()


def complete(stack: LocalStack, prompt: str, **extra: Any) -> tuple[int, dict[str, Any], float]:
    """POST /v1/completions: status, JSON answer, seconds taken."""
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    req = urllib.request.Request(
        f"{stack.url}/v1/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S + 10) as resp:
            return resp.status, json.load(resp), time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc), time.monotonic() - start


def prompt(n_chars: int = 700) -> str:
    """A prompt no other test sent (its first chunk differs, so no chunk is shared)."""
    return (uuid.uuid4().hex + " the same long context ") * (n_chars // 55 + 1)


def test_both_nodes_serve_and_name_themselves(stack: LocalStack) -> None:
    nodes = {stack.node_settings(n, stack.settings).node for n in stack.names if "-" in n}
    assert stack.nats is not None and len(stack.nats.servers) == 3
    served = set()
    with ThreadPoolExecutor(8) as pool:
        for status, answer, _ in pool.map(lambda _: complete(stack, prompt()), range(8)):
            assert status == 200, answer
            served.add(answer["cake"]["node"])
    assert served == nodes  # the least loaded node takes each new prompt: both took some


def test_a_chunk_stored_by_one_node_is_loaded_by_the_other(stack: LocalStack) -> None:
    """The same prompt again goes to the node whose memory holds it (prefix-aware routing); with
    that node's compute gone, the other node loads what the first stored."""
    text = prompt()
    status, first, _ = complete(stack, text)
    assert status == 200, first
    writer = first["cake"]["node"]
    status, again, _ = complete(stack, text)
    assert (status, again["cake"]["node"]) == (200, writer), again
    assert again["cake"]["reused_tokens"] > 0  # from the writer's memory tier
    stack.stop([process for process in stack.names if process.startswith("compute-")
                and stack.node_settings(process, stack.settings).node == writer])  # fmt: skip
    for _ in range(20):  # the write-back finishes after the answer
        status, second, _ = complete(stack, text, kv_mode="load")
        assert status == 200, second
        if second["cake"]["chunks_loaded"]:
            break
        time.sleep(0.25)
    assert second["cake"]["node"] != writer
    assert second["cake"]["chunks_loaded"] == second["cake"]["chunks_total"] - 1 > 5
    assert second["choices"][0]["text"] == first["choices"][0]["text"]  # the same KV


def test_a_node_killed_under_load_loses_no_request(stack: LocalStack) -> None:
    """SIGKILL one node's compute while 6 requests run: each completes (sent again to the other
    node when its compute went silent before answering) or gets a clear error; new requests go
    to the surviving node."""
    victim = stack.procs["compute-1"]
    with ThreadPoolExecutor(6) as pool:
        running = [
            pool.submit(complete, stack, prompt(1500), max_tokens=150) for _ in range(6)
        ]  # fmt: skip
        time.sleep(2.0)
        victim.kill()
        outcomes = [f.result() for f in running]
    for status, answer, seconds in outcomes:
        assert seconds < REQUEST_TIMEOUT_S
        assert status == 200 or (status == 503 and answer["error"]["message"]), answer
    assert sum(status == 200 for status, _, _ in outcomes) >= 5, outcomes
    with urllib.request.urlopen(f"{stack.url}/metrics", timeout=5) as resp:
        retried = samples(resp.read().decode())["cake_backend_retries_total"]
    assert 1 <= retried <= 6  # the kill hit requests in flight; they were sent again
    survivor = stack.node_settings("compute-2", stack.settings).node
    for _ in range(3):
        status, answer, seconds = complete(stack, prompt())
        assert (status, answer["cake"]["node"]) == (200, survivor), answer
        assert seconds < 10


def test_a_nodes_loader_killed_under_load_costs_loads_not_answers(stack: LocalStack) -> None:
    """SIGKILL one node's loader while requests with stored prefixes run: lookups go to the
    other loader, that node's requests compute what they cannot fetch, and every answer is the
    one computing alone gives."""
    texts = [prompt(1200) for _ in range(4)]
    reference = {}
    for text in texts:  # stored (written back), and the answer computing alone gives
        status, answer, _ = complete(stack, text, kv_mode="compute")
        assert status == 200, answer
        reference[text] = answer["choices"][0]["text"]
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(complete, stack, text, max_tokens=8) for text in texts * 2]
        time.sleep(0.3)
        stack.procs["loader-1"].kill()
        outcomes = [f.result() for f in running]
    for text, (status, answer, seconds) in zip(texts * 2, outcomes, strict=True):
        assert status == 200, answer
        assert answer["choices"][0]["text"] == reference[text]
        assert seconds < 20
    status, answer, _ = complete(stack, texts[0], kv_mode="load")
    assert status == 200 and answer["cake"]["chunks_loaded"] > 0, answer  # the other loader


def test_a_nats_server_killed_is_survived(stack: LocalStack) -> None:
    """One of the three nats-servers killed under load: requests in flight end (answered, or a
    clear error such as 503 while the gateway reconnects), none past its deadline; clients on
    that server reconnect to another within seconds, and then every request is answered."""
    assert stack.nats is not None
    with ThreadPoolExecutor(2) as pool:
        during = [pool.submit(complete, stack, prompt()) for _ in range(4)]
        time.sleep(0.3)
        stack.nats.servers[0].process.kill()
        outcomes = [f.result() for f in during]
        killed_at = time.monotonic()
        status = 0
        while status != 200:  # until the clients on the dead server have reconnected
            assert time.monotonic() - killed_at < 15, "not served again within 15 s"
            status, answer, _ = complete(stack, prompt())
            outcomes.append((status, answer, 0.0))
        after = list(pool.map(lambda _: complete(stack, prompt()), range(6)))
    for status, answer, seconds in outcomes + after:
        assert seconds < REQUEST_TIMEOUT_S, answer
        assert status == 200 or answer["error"]["message"], answer
    assert all(status == 200 for status, _, _ in after), after
