"""Metrics: every service's families after real requests, the metrics servers, their settings."""

from __future__ import annotations

import asyncio
import importlib
import random
import socket
import string
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.compute.service import Compute
from services.gateway.metrics import GatewayMetrics
from services.launcher.cli import build_parser, settings_from_args
from services.launcher.nats_server import free_port, port_free
from services.launcher.stack import SERVICES, LocalStack, metrics_port
from services.loader.metrics import LoaderMetrics
from services.loader.service import Loader
from services.merger.service import Merger
from shared.core.errors import ConfigError
from shared.runtime import observability
from shared.runtime.config import Settings
from shared.runtime.metrics import new_registry, render, serve_metrics
from shared.runtime.service import serve
from shared.storage.local import LocalStore
from shared.wire import subjects
from shared.wire.bus import Bus
from shared.wire.messages import Accepted, LookupReply, LookupRequest, ModelInfo, Space
from tests.harness import Backend, backend, stack_settings
from tests.prom import families, samples, value

OLD_GATEWAY_NAMES = {  # what users of the gateway's /metrics scrape: unchanged
    "cake_requests_total": "counter",
    "cake_ttft_seconds": "histogram",
    "cake_prompt_tokens_total": "counter",
    "cake_cache_lookups_total": "counter",
    "cake_cache_hit_tokens_total": "counter",
    "cake_prompt_tokens_cacheable_total": "counter",
    "cake_errors_total": "counter",
    "cake_generated_tokens_total": "counter",
}
OLD_LOADER_NAMES = {  # once mirrored by the gateway, now on the loader's own port
    "cake_bytes_loaded_total": "counter",
    "cake_chunks_loaded_total": "counter",
    "cake_load_failures_total": "counter",
    "cake_corrupt_chunks_total": "counter",
    "cake_lookups_total": "counter",
    "cake_bytes_stored_total": "counter",
    "cake_chunks_stored_total": "counter",
    "cake_store_failures_total": "counter",
    "cake_store_usage_bytes": "gauge",
}


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(n))


# --- the library and the metrics server ---------------------------------------------------


def test_each_service_object_has_its_own_registry_without_created_series() -> None:
    first, second = GatewayMetrics(), GatewayMetrics()  # no clash: not the global registry
    first.requests.labels(kv_mode="cake", status="200").inc()
    assert value(first.registry, "cake_requests_total", kv_mode="cake", status="200") == 1
    assert value(second.registry, "cake_requests_total", kv_mode="cake", status="200") == 0
    body, content_type = render(first.registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert "_created" not in body.decode()
    assert set(families(body.decode())) >= set(OLD_GATEWAY_NAMES)


def test_render_negotiates_openmetrics() -> None:
    body, content_type = render(GatewayMetrics().registry, "application/openmetrics-text")
    assert content_type.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")


def test_store_usage_is_exposed_only_when_the_store_reports_it() -> None:
    reporting = render(LoaderMetrics(lambda: 5, lambda: 1000).registry)[0].decode()
    assert samples(reporting)["cake_store_usage_bytes"] == 1000
    assert samples(reporting)["cake_staging_bytes"] == 5
    silent = render(LoaderMetrics(lambda: 5, lambda: None).registry)[0].decode()  # S3
    assert "cake_store_usage_bytes" not in silent
    assert samples(silent)["cake_staging_bytes"] == 5


async def test_serve_metrics_serves_and_closes_its_port() -> None:
    metrics = GatewayMetrics()
    metrics.generated.inc(3)
    port = free_port()
    async with serve_metrics(metrics.registry, "127.0.0.1", port) as url:
        assert url == f"http://127.0.0.1:{port}/metrics"
        assert not port_free(port)
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert samples(await resp.text())["cake_generated_tokens_total"] == 3
    assert port_free(port)
    with pytest.raises(RuntimeError):  # closed on the way out of a failing block too
        async with serve_metrics(metrics.registry, "127.0.0.1", port):
            raise RuntimeError("boom")
    assert port_free(port)


async def test_serve_metrics_on_port_0_serves_nothing_and_a_busy_port_is_a_config_error() -> None:
    async with serve_metrics(new_registry(), "127.0.0.1", 0) as url:
        assert url is None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="CAKE_METRICS_PORT"):
            async with serve_metrics(new_registry(), "127.0.0.1", port):
                pass


def test_metrics_port_setting_flag_and_cake_up_ports() -> None:
    assert Settings().metrics_port == 9464
    assert Settings.from_env({"CAKE_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(ConfigError, match="CAKE_METRICS_PORT"):
        Settings.from_env({"CAKE_METRICS_PORT": "70000"})
    args = build_parser().parse_args(["serve", "loader", "--metrics-port", "9999"])
    assert settings_from_args(args).metrics_port == 9999
    base = Settings(metrics_port=9500)
    ports = {s: metrics_port(s, base) for s in SERVICES}
    assert ports == {"gateway": 0, "merger": 9500, "compute": 9501, "loader": 9502}
    assert not any(metrics_port(s, Settings(metrics_port=0)) for s in SERVICES)


def test_cake_up_lists_every_services_metrics_url(tmp_path: Path) -> None:
    settings = Settings(port=8123, metrics_port=9500, staging_dir=str(tmp_path))
    stack = LocalStack(settings, start_nats=False)
    assert stack.metrics_urls() == {
        "gateway": "http://127.0.0.1:8123/metrics",
        "merger": "http://127.0.0.1:9500/metrics",
        "compute": "http://127.0.0.1:9501/metrics",
        "loader": "http://127.0.0.1:9502/metrics",
    }
    off = LocalStack(settings.replace(metrics_port=0), start_nats=False)
    assert list(off.metrics_urls()) == ["gateway"]


# --- every service's families after real requests -------------------------------------------


async def post(be: Backend, prompt: str, kv_mode: str, max_tokens: int = 4) -> dict[str, Any]:
    body = {"prompt": prompt, "kv_mode": kv_mode, "max_tokens": max_tokens, "temperature": 0}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{be.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def test_every_service_counts_real_requests(nats_url: str, tmp_path: Path) -> None:
    settings = stack_settings(nats_url, tmp_path)
    prompt = text(400, seed=1)  # 400 byte tokens: 6 chunks of 64 stored, then hit
    async with LocalStore(settings.store) as store, backend(settings, store, SERVICES) as be:
        compute, loader, merger = (be.services[s] for s in ("compute", "loader", "merger"))
        assert isinstance(compute, Compute) and isinstance(loader, Loader)
        assert isinstance(merger, Merger)
        c, lo, m = compute.metrics.registry, loader.metrics.registry, merger.metrics.registry
        assert value(c, "cake_compute_kv_cache_bytes") == 0
        answer = await post(be, prompt, "cake")  # no hit: computes, writes 6 chunks back
        generated_first = answer["usage"]["completion_tokens"]
        assert value(lo, "cake_chunks_stored_total") == 6
        assert value(lo, "cake_bytes_stored_total") > 0
        assert value(lo, "cake_store_usage_bytes") == value(lo, "cake_bytes_stored_total")
        assert value(m, "cake_merger_requests_total", kv_mode="cake", outcome="no_hit") == 1

        # a load-only request: the loader stages all 6; compute's KV memory and running count
        # are up while it decodes
        request = asyncio.ensure_future(post(be, prompt, "load", max_tokens=32))
        seen_kv = seen_running = seen_staged = 0.0
        while not request.done():
            seen_kv = max(seen_kv, value(c, "cake_compute_kv_cache_bytes"))
            seen_running = max(seen_running, value(c, "cake_compute_requests_running"))
            seen_staged = max(seen_staged, value(lo, "cake_staging_bytes"))
            await asyncio.sleep(0.001)
        answer = await request
        assert answer["cake"]["chunks_loaded"] == 6
        layout = compute.runner.layout
        per_token = layout.layers * 2 * layout.kv_heads * layout.head_dim
        per_token *= compute.runner.dtype.itemsize
        assert seen_kv >= 400 * per_token
        assert seen_running == 1
        assert seen_staged > 0
        assert value(lo, "cake_staging_bytes") == 0  # merged chunks leave staging
        assert value(lo, "cake_chunks_loaded_total") == 6
        assert value(lo, "cake_bytes_loaded_total") == value(lo, "cake_bytes_stored_total")
        assert value(lo, "cake_chunk_fetch_seconds_count") == 6
        assert value(lo, "cake_lookups_total") == 2
        assert value(lo, "cake_load_failures_total") == 0
        assert value(m, "cake_merger_requests_total", kv_mode="load", outcome="met") == 1
        assert value(m, "cake_merger_meet_position_ratio_bucket", le="0.0") == 1  # all loaded

        generated = answer["usage"]["completion_tokens"]
        answer = await post(be, prompt, "cake")  # a hit: the estimator advises, the sides meet
        generated += answer["usage"]["completion_tokens"]
        assert sum(
            value(m, "cake_merger_advice_total", advice=kind)
            for kind in ("skip_head", "no_fetch", "hint", "none")
        ) == 1  # fmt: skip
        assert value(m, "cake_merger_meet_position_ratio_count") == 2
        outcomes = ("met", "stalled", "no_fetch", "no_loader")
        assert sum(value(m, "cake_merger_requests_total", kv_mode="cake", outcome=o)
                   for o in outcomes) == 1  # fmt: skip

        # compute: every request finished and left; tokens by kind; steps timed
        for _ in range(100):  # Done may land just after the answer's last token
            if value(c, "cake_compute_requests_running") == 0:
                break
            await asyncio.sleep(0.01)
        finished = sum(
            value(c, "cake_compute_requests_finished_total", finish_reason=reason)
            for reason in ("stop", "length")
        )
        assert finished == 3
        generated += generated_first
        assert value(c, "cake_compute_requests_running") == 0
        assert value(c, "cake_compute_kv_cache_bytes") == 0
        assert value(c, "cake_compute_queue_depth") == 0
        assert value(c, "cake_compute_token_budget") == settings.token_budget
        # each request's first token comes with its prefill, the others one per decode piece
        assert value(c, "cake_compute_tokens_total", kind="decode") == generated - 3
        assert value(c, "cake_compute_tokens_total", kind="prefill") >= 400
        steps = value(c, "cake_compute_step_seconds_count")
        assert steps >= generated - 3
        assert value(c, "cake_compute_step_seconds_sum") > 0

        # the gateway: the names it always had, values from these three requests
        async with aiohttp.ClientSession() as http, http.get(f"{be.url}/metrics") as resp:
            exposed = await resp.text()
    assert OLD_GATEWAY_NAMES.items() <= families(exposed).items()
    got = samples(exposed)
    assert got['cake_requests_total{kv_mode="cake",status="200"}'] == 2
    assert got['cake_requests_total{kv_mode="load",status="200"}'] == 1
    assert got["cake_cache_lookups_total"] == 3
    assert got["cake_cache_hit_tokens_total"] == 2 * 6 * 64
    assert got['cake_prompt_tokens_total{source="loaded"}'] >= 6 * 64
    assert got["cake_generated_tokens_total"] == generated
    assert got["cake_ttft_seconds_count"] == 3
    assert got['cake_request_duration_seconds_count{kv_mode="cake"}'] == 2


# --- each service's run() serves its metrics port and closes it ----------------------------


async def scrape(url: str, task: asyncio.Task[None]) -> str:
    """The metrics text at url, once the service serves it (fails if the service died)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            assert not task.done(), task
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return await resp.text()
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing served {url}")


@pytest.mark.parametrize(
    "service,families_of_it",
    [
        ("loader", {**OLD_LOADER_NAMES, "cake_chunk_fetch_seconds": "histogram"}),
        ("merger", {"cake_merger_requests_total": "counter"}),
        ("compute", {"cake_compute_requests_running": "gauge"}),
    ],
)
async def test_a_service_serves_its_metrics_port_until_it_stops(
    nats_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    service: str,
    families_of_it: dict[str, str],
) -> None:
    monkeypatch.setattr(observability, "_provider", None)
    port = free_port()
    settings = stack_settings(nats_url, tmp_path, metrics_port=port, log_format="json")
    build = importlib.import_module(f"services.{service}.service").build
    stop = asyncio.Event()
    task = asyncio.create_task(serve(service, build, settings, stop))
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        exposed = await scrape(url, task)
        assert families_of_it.items() <= families(exposed).items()
        assert not set(OLD_GATEWAY_NAMES) & set(families(exposed))  # the gateway's stay there
        if service == "loader":  # a lookup moves the loader's counter, as the scrape shows
            bus = await Bus.connect(nats_url, "test-metrics")
            try:
                space = Space("f" * 64, 1, 1, 8, "float32", 64)
                ask = LookupRequest("metrics-test", space, b"")
                await bus.request(subjects.LOOKUP, ask, LookupReply, timeout_s=5)
            finally:
                await bus.close()
            assert samples(await scrape(url, task))["cake_lookups_total"] == 1
        if service == "compute":
            bus = await Bus.connect(nats_url, "test-metrics")
            try:  # the model is loaded: it answers
                await bus.request(subjects.COMPUTE_INFO, Accepted(), ModelInfo, timeout_s=5)
            finally:
                await bus.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert port_free(port)
