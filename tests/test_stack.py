"""`cake up`: the whole stack as separate processes serves HTTP; SIGINT stops all of it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.launcher.nats_server import free_port, free_ports
from services.launcher.stack import LocalStack
from shared.runtime.config import Settings
from tests.prom import samples

ANONYMOUS_CLIENT = """
import asyncio, sys
import nats

async def main():
    try:
        nc = await nats.connect(sys.argv[1], allow_reconnect=False, connect_timeout=2)
        await nc.subscribe("cake.>")
        await nc.flush(timeout=2)
        print("connected")
    except Exception:
        print("refused")

asyncio.run(main())
"""


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cake_up_serves_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    metrics_base = free_ports(3)
    env = {**os.environ, "CAKE_STAGING_DIR": str(tmp_path / "staging"), "CAKE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.launcher.cli", "up", "--port", str(port),
         "--store", str(tmp_path / "store"), "--chunk-tokens", "64",
         "--metrics-port", str(metrics_base)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner = ""
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in banner and time.monotonic() < deadline:
            banner += proc.stdout.readline()
            assert proc.poll() is None, banner
        # after "Cake is serving ...": one line per service with its metrics URL
        urls = dict(re.findall(r"^  (\w+) metrics: (\S+)$", banner, re.MULTILINE))
        assert urls == {
            "gateway": f"http://127.0.0.1:{port}/metrics",
            "merger": f"http://127.0.0.1:{metrics_base}/metrics",
            "compute": f"http://127.0.0.1:{metrics_base + 1}/metrics",
            "loader": f"http://127.0.0.1:{metrics_base + 2}/metrics",
        }
        assert banner.index("Cake is serving") < banner.index("gateway metrics")
        nats_port = int(re.search(r"NATS nats://127.0.0.1:(\d+)", banner).group(1))  # type: ignore[union-attr]
        body = json.dumps({"prompt": "y" * 200, "max_tokens": 3}).encode()
        for _ in range(2):
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", body,
                {"Content-Type": "application/json"},
            )  # fmt: skip
            with urllib.request.urlopen(req, timeout=60) as resp:
                answer = json.load(resp)
        assert answer["usage"]["completion_tokens"] == 3
        # the second request found its 3 usable chunks in compute's memory tier (on by default)
        assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 192
        assert answer["cake"]["reused_tokens"] == 192
        scraped = {}
        for name, url in urls.items():
            with urllib.request.urlopen(url, timeout=10) as resp:
                scraped[name] = resp.read().decode()
        assert "cake_requests_total{" in scraped["gateway"]
        assert "cake_merger_requests_total{" in scraped["merger"]
        assert "cake_compute_requests_finished_total{" in scraped["compute"]
        assert samples(scraped["loader"])["cake_chunks_stored_total"] == 3  # the first's chunks
        assert samples(scraped["loader"])["cake_lookups_total"] >= 2
        # the embedded nats-server takes only the services' own users
        anonymous = subprocess.run(
            [sys.executable, "-c", ANONYMOUS_CLIENT, f"nats://127.0.0.1:{nats_port}"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert anonymous.stdout.strip() == "refused", anonymous.stdout + anonymous.stderr
        assert "password" not in banner.lower() and "@127.0.0.1" not in banner
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert not port_open(port) and not port_open(nats_port)
        assert not any(port_open(metrics_base + i) for i in range(3))
        assert "Traceback" not in (proc.stdout.read() or "")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_stack_restarts_what_dies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service killed under `cake up` (SIGKILL: no goodbye) is restarted and the stack serves
    again; so is a killed nats-server, on its port, and the services reconnect. Services
    restarted together each start after all the old ones stopped (what the benchmarks' fresh
    merger relies on to hear nothing of the last link)."""
    settings = Settings(
        port=free_port(), metrics_port=0, store=str(tmp_path / "store"),
        staging_dir=str(tmp_path / "staging"), chunk_tokens=64, log_level="warning",
    ).validated()  # fmt: skip
    stack = LocalStack(settings)
    body = json.dumps({"prompt": "z" * 100, "max_tokens": 2}).encode()

    def served_within(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            stack.supervise()
            req = urllib.request.Request(
                f"{stack.url}/v1/completions", body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    return bool(json.load(resp)["usage"]["completion_tokens"] == 2)
            except OSError:
                time.sleep(0.5)
        return False

    try:
        stack.start()
        assert served_within(30)
        compute = stack.procs["compute"]
        compute.kill()
        compute.wait()
        assert served_within(60)
        assert stack.procs["compute"].pid != compute.pid
        assert stack.nats is not None
        nats = stack.nats.servers[0]
        nats.process.kill()
        nats.process.wait()
        assert served_within(60)
        assert stack.nats.servers[0].port == nats.port
        old = {service: stack.procs[service] for service in ("merger", "loader")}
        alive_at_spawn: dict[str, list[str]] = {}
        spawn = stack.spawn

        def spawn_noting_the_old(name: str, with_settings: Settings) -> None:
            alive_at_spawn[name] = [s for s, proc in old.items() if proc.poll() is None]
            spawn(name, with_settings)

        monkeypatch.setattr(stack, "spawn", spawn_noting_the_old)
        stack.restart_each({"merger": {}, "loader": {"fetch_concurrency": 2}})
        assert alive_at_spawn == {"merger": [], "loader": []}
        assert stack.settings_of["loader"].fetch_concurrency == 2
        assert stack.settings_of["merger"].fetch_concurrency == settings.fetch_concurrency != 2
        assert served_within(30)
    finally:
        stack.close()
