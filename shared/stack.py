"""`cake up`: nats-server (unless --nats-url) and the four services as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from shared.cli import SERVICES
from shared.config import Settings, env_var
from shared.nats_server import NatsServer

READY_TIMEOUT_S = 120.0


def service_env(settings: Settings, nats_url: str) -> dict[str, str]:
    """The environment each service process gets: this one plus every setting as CAKE_*."""
    env = dict(os.environ)
    for name, value in vars(settings).items():
        if value is not None:
            env[env_var(name)] = str(value)
    env[env_var("nats_url")] = nats_url
    return env


def wait_ready(url: str, procs: dict[str, subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Until the gateway's /health answers 200 (and the model is loaded: /v1/models lists it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the stack was not ready within {timeout_s:.0f}s")


def stop_all(procs: dict[str, subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    """SIGTERM every service (gateway first: it stops taking requests), then SIGKILL laggards."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_stack(settings: Settings, start_nats: bool) -> int:
    """Run everything until Ctrl-C or a service dies; leave nothing running."""
    Path(settings.staging_dir).mkdir(parents=True, exist_ok=True)
    nats = NatsServer.start() if start_nats else None
    nats_url = nats.url if nats else settings.nats_url
    env = service_env(settings, nats_url)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for name in (*SERVICES[1:], SERVICES[0]):  # the gateway last
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "serve", name], env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop them in order
            )  # fmt: skip
        url = f"http://{settings.host}:{settings.port}"
        wait_ready(url, procs, READY_TIMEOUT_S)
        print(f"Cake is serving {settings.model} at {url}/v1 (NATS {nats_url}). Ctrl-C stops.")
        sys.stdout.flush()
        while not stopping:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                print(f"cake: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"cake: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(procs)
        if nats:
            nats.stop()
