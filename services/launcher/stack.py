"""`cake up`: nats-server (unless --nats-url) and the four services as separate processes;
with --nodes N, N nodes (a compute and a loader each) behind one gateway and merger, over a
cluster of nats-servers."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from services.gateway.app import HEALTH_CACHE_S
from services.launcher.nats_auth import authorization, new_passwords, with_credentials
from services.launcher.nats_server import NatsCluster
from shared.core.errors import ConfigError
from shared.runtime.config import Settings, env_var
from shared.runtime.observability import configure_logging

log = structlog.get_logger(__name__)
SERVICES = ("gateway", "merger", "compute", "loader")
NODE_SERVICES = ("compute", "loader")  # one of each per node
CLUSTER_SIZE = 3  # nats-servers under several nodes (one may die; the others carry on)
READY_TIMEOUT_S = 120.0
CRASH_LIMIT = 5  # deaths of one service within CRASH_WINDOW_S that stop the whole stack
CRASH_WINDOW_S = 120.0
MAX_BACKOFF_S = 30.0
# `cake up` runs every service on one host: each gets CAKE_METRICS_PORT + its offset (node i's
# compute and loader: + 1 + 2i and + 2 + 2i)
METRICS_PORT_OFFSETS = {"merger": 0, "compute": 1, "loader": 2}


def service_of(process: str) -> tuple[str, int | None]:
    """The service a process runs and its node's number (None: not one of several nodes):
    `compute-2` -> ("compute", 2), `merger` -> ("merger", None)."""
    service, _, number = process.partition("-")
    return service, int(number) if number else None


def metrics_port(process: str, settings: Settings) -> int:
    """The metrics port `cake up` gives a process (0: none; the gateway's is its own port)."""
    service, number = service_of(process)
    if service not in METRICS_PORT_OFFSETS or not settings.metrics_port:
        return 0
    return settings.metrics_port + METRICS_PORT_OFFSETS[service] + 2 * ((number or 1) - 1)


def process_names(nodes: int) -> list[str]:
    """The processes of a stack: gateway, merger, and each node's compute and loader (named
    `compute` and `loader` on one node, `compute-1`, `loader-1`, `compute-2`... on several)."""
    if nodes == 1:
        return list(SERVICES)
    per_node = [f"{s}-{i}" for i in range(1, nodes + 1) for s in NODE_SERVICES]
    return ["gateway", "merger", *per_node]


class LocalStack:
    """Processes of one local Cake stack; services can be restarted with changed settings."""

    def __init__(self, settings: Settings, start_nats: bool = True, nodes: int = 1) -> None:
        if nodes < 1:
            raise ConfigError(f"--nodes must be at least 1, got {nodes}")
        self.settings, self.nodes = settings, nodes
        # its own nats-servers: a user per service role, fresh passwords on every start
        self.passwords = new_passwords() if start_nats else {}
        self.authorization = authorization(self.passwords) if start_nats else None
        size = 1 if nodes == 1 else CLUSTER_SIZE
        self.nats = NatsCluster.start(size, self.authorization) if start_nats else None
        self.nats_url = self.nats.url if self.nats else settings.nats_url  # (no secrets in it)
        self.names = process_names(nodes)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.settings_of: dict[str, Settings] = {}  # what each service was started with
        self.deaths: dict[str, list[float]] = {}  # when each service was found dead
        self.restart_at: dict[str, float] = {}  # dead services waiting out their backoff
        self.url = f"http://{settings.host}:{settings.port}"
        Path(settings.staging_dir).mkdir(parents=True, exist_ok=True)

    def env(self, settings: Settings) -> dict[str, str]:
        """This process's environment plus every setting as CAKE_*."""
        env = dict(os.environ)
        for name, value in vars(settings).items():
            if value is not None:
                env[env_var(name)] = str(value)
        return env

    def nats_url_for(self, role: str) -> str:
        """The NATS URL a role connects with (its credentials in it, on our own server)."""
        if role not in self.passwords:
            return self.nats_url
        return with_credentials(self.nats_url, role, self.passwords[role])

    def processes(self, services: Sequence[str] | None) -> list[str]:
        """The process names meant by services (a service kind means every node's; None: all)."""
        if services is None:
            return list(self.names)
        return [n for n in self.names if n in services or service_of(n)[0] in services]

    def node_settings(self, process: str, settings: Settings) -> Settings:
        """A node's process gets the node's name and its own staging directory."""
        number = service_of(process)[1]
        if number is None:
            return settings
        node = f"{settings.node}-{number}"
        return settings.replace(node=node, staging_dir=str(Path(settings.staging_dir) / node))

    def start(self, services: Sequence[str] | None = None, **changes: Any) -> None:
        """Start services (the gateway last) and wait until the gateway answers /health."""
        settings = self.settings.replace(**changes) if changes else self.settings
        self.launch([(name, settings) for name in self.processes(services)])

    def launch(self, plan: Sequence[tuple[str, Settings]]) -> None:
        """Start each process with its settings (the gateway last) and wait until the gateway
        answers /health."""
        fresh_after = time.monotonic() + HEALTH_CACHE_S  # a finding from before is no news
        for name, settings in sorted(plan, key=lambda p: p[0] == "gateway"):
            self.spawn(name, settings)
        self.wait_ready(fresh_after=fresh_after)

    def spawn(self, name: str, settings: Settings) -> None:
        """Start one service process (not waiting for it)."""
        service = service_of(name)[0]
        env = self.env(self.node_settings(name, settings))
        env[env_var("metrics_port")] = str(metrics_port(name, settings))
        env[env_var("nats_url")] = self.nats_url_for(service)
        if service == "compute" and self.nodes > 1 and "OMP_NUM_THREADS" not in env:
            # nodes sharing this host's cores: each compute its share, not all of them each
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.nodes))
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.launcher.cli", "serve", service],
            env=env,
            start_new_session=True,  # Ctrl-C reaches only `cake up`; it stops them in order
        )  # fmt: skip
        self.settings_of[name] = settings

    def supervise(self) -> None:
        """Restart what died: nats-server on its port (services reconnect), a service after a
        backoff that doubles while it keeps dying (1 s, 2 s ... 30 s); RuntimeError once one
        died CRASH_LIMIT times within CRASH_WINDOW_S."""
        if self.nats is not None:
            for i in self.nats.restart_dead():
                log.warning("nats-server exited; restarted it", port=self.nats.servers[i].port)
        now = time.monotonic()
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            if name in self.restart_at:  # waiting out its backoff
                if now >= self.restart_at[name]:
                    del self.restart_at[name]
                    self.spawn(name, self.settings_of[name])
                continue
            self.restart_at[name] = now + self.backoff(name, now, proc.returncode)

    def backoff(self, name: str, now: float, exit_code: int | None) -> float:
        """Note a death of a service; seconds until it is restarted."""
        deaths = [t for t in self.deaths.get(name, []) if now - t < CRASH_WINDOW_S] + [now]
        self.deaths[name] = deaths
        if len(deaths) >= CRASH_LIMIT:
            raise RuntimeError(f"{name} died {len(deaths)} times in {CRASH_WINDOW_S:g}s")
        wait = min(MAX_BACKOFF_S, 2.0 ** (len(deaths) - 1))
        log.warning("service exited; restarting it", service=name, exit_code=exit_code, in_s=wait)
        return wait

    def metrics_urls(self) -> dict[str, str]:
        """Where each service serves its metrics (services without a metrics port left out)."""
        urls = {"gateway": f"{self.url}/metrics"}
        for name in self.names:
            port = metrics_port(name, self.settings)
            if port:
                urls[name] = f"http://{self.settings.host}:{port}/metrics"
        return urls

    def restart(self, service: str, **changes: Any) -> None:
        """Stop a service (every node's, for a kind) and start it again with some settings
        changed."""
        self.restart_each({service: changes})

    def restart_each(self, changes: Mapping[str, Mapping[str, Any]]) -> None:
        """Stop these services, then start each again with its own settings changed: no new
        process hears from an old one of the others (a fresh merger hears no telemetry of the
        loader it is started with, from the one that loader replaces)."""
        self.stop(list(changes))
        self.launch([
            (name, self.settings.replace(**service_changes))
            for service, service_changes in changes.items() for name in self.processes([service])
        ])  # fmt: skip

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, fresh_after: float = 0.0) -> None:
        """Until the gateway answers /health (every service answers, the model is loaded) with
        a finding made after `fresh_after` (monotonic: /health reuses one for a second); on
        several nodes, until every process answers on its metrics port too (it serves them once
        started: /health hears from any one compute)."""
        deadline = time.monotonic() + timeout_s
        urls = self.metrics_urls().items()
        each = [url for name, url in urls if name != "gateway"] if self.nodes > 1 else []
        while time.monotonic() < deadline:
            self.check_alive()
            fresh = time.monotonic() > fresh_after
            if fresh and answers(f"{self.url}/health") and all(answers(url) for url in each):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the stack was not ready within {timeout_s:.0f}s")

    def check_alive(self) -> None:
        """RuntimeError naming any service that exited."""
        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited")

    def stop(self, services: Sequence[str] | None = None, timeout_s: float = 15.0) -> None:
        """SIGTERM services (all by default, the gateway first), SIGKILL any that linger."""
        names = [n for n in self.processes(services) if n in self.procs]
        for name in names:
            if self.procs[name].poll() is None:
                self.procs[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name in names:
            proc = self.procs.pop(name)
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        """Stop every service and the nats-server this stack started. Idempotent."""
        self.stop()
        if self.nats:
            self.nats.stop()
            self.nats = None


def answers(url: str) -> bool:
    """Whether a GET of url answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, http.client.HTTPException):  # not up yet, or not ours
        return False


def run_stack(settings: Settings, start_nats: bool, nodes: int = 1) -> int:
    """`cake up`: run everything until Ctrl-C or a service dies; leave nothing running."""
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    configure_logging("stack", settings.log_format, settings.log_level)
    stack = LocalStack(settings, start_nats, nodes)
    try:
        stack.start()
        on = f" on {nodes} nodes" if nodes > 1 else ""
        print(f"Cake is serving {settings.model}{on} at {stack.url}/v1 (NATS {stack.nats_url}).")
        for name, url in stack.metrics_urls().items():
            print(f"  {name} metrics: {url}")
        print("Ctrl-C stops everything; a service that dies is restarted.", flush=True)
        while not stopping:
            stack.supervise()
            time.sleep(0.2)
        return 0
    except (RuntimeError, ConfigError) as exc:
        print(f"cake: {exc}; stopping", file=sys.stderr)
        return 1
    finally:
        stack.close()
