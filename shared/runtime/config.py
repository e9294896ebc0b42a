"""All of Cake's settings, read in one place: environment variables, overridden by CLI flags.

Each field's environment variable is CAKE_<FIELD NAME IN CAPITALS> (see ENV_VARS); the
OpenTelemetry exporter reads the standard OTEL_* variables itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.core.bandwidth import BandwidthTrace
from shared.core.errors import ConfigError
from shared.kv.format import CODECS

SHM_ROOM_BYTES = 1 << 30  # shared memory smaller than this (Docker's default is 64 MiB) is not used


def staging_base(shm: Path = Path("/dev/shm")) -> Path:
    """Where the staging area goes by default: shared memory when it is writable and holds
    SHM_ROOM_BYTES, else the temporary directory (a small /dev/shm would fail every load)."""
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).total >= SHM_ROOM_BYTES:
        return shm
    return Path(tempfile.gettempdir())


def _default_staging() -> str:
    return str(staging_base() / "cake-staging")


def _default_node() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())[:64]


@dataclass(frozen=True)
class Settings:
    """Every setting, with its default."""

    nats_url: str = "nats://127.0.0.1:4222"
    model: str = "default"  # "default", a local directory or a hub id
    model_revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    store: str = ".cake/store"  # a path, file:///path, s3://bucket/prefix or memory://
    store_capacity_gb: float | None = None
    store_cache: str | None = None  # a local directory in front of the store (read-through)
    store_cache_gb: float | None = None  # its capacity (least recently used chunks go)
    store_bandwidth_mbps: float | None = None  # emulate a slower tier (benchmarks)
    store_bandwidth_trace: str | None = None  # or one that changes: "t0:MBps,t1:MBps,..." or a file
    store_bandwidth_period_s: float | None = None  # the trace repeats (default: last t + its gap)
    store_bandwidth_epoch: float | None = None  # Unix time of the trace's 0 (default: start)
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_part_mb: float = 8.0  # larger objects are read as ranged GETs in parallel; 0: one GET
    staging_dir: str = field(default_factory=_default_staging)
    chunk_tokens: int = 256
    node: str = field(default_factory=_default_node)
    host: str = "127.0.0.1"  # listen address of the gateway and of every metrics server
    port: int = 8000  # the gateway's HTTP port (its /metrics too)
    metrics_port: int = 9464  # merger/compute/loader serve /metrics here; 0: no metrics server
    request_timeout_s: float = 300.0
    telemetry_s: float = 1.0  # compute and loader publish their telemetry this often
    heartbeat_s: float = 2.0  # compute says Alive this often per request; 3 missed: it is gone
    rpc_timeout_s: float = 5.0  # one request/reply hop (lookup, dispatch)
    fetch_timeout_s: float = 30.0  # one chunk read from storage
    fetch_concurrency: int = 4
    link_probe_s: float = 1.0  # an idle loader probes its link this often (0: never)
    token_budget: int = 512  # tokens per compute scheduler step
    target_itl_ms: float | None = None  # steer the step budget to this inter-token latency
    decode_share: float = 0.5  # most of a step's budget decode tokens take while prompts wait
    kv_memory_gb: float | None = None  # KV memory budget of a compute replica (None: derived)
    max_waiting: int = 64  # requests a compute replica queues beyond those it runs; then 429
    head_tokens: int = 512  # tokens per compute step of a Cake head (the paper's compute chunk)
    memory_tier: bool = True  # keep prompt chunks' KV in compute memory for later requests
    exact_splits: bool = False  # every forward pass covers exactly one storage chunk
    skip_head_ratio: float = 0.35  # run load-only when a chunk loads in < this x its compute time
    split_cost_chunks: float = 4.0  # compute a hit whole when a split saves <= this many chunks
    controllers: bool = True  # plans and the fetch limit follow telemetry (off: fixed settings)
    kv_secret: str | None = field(default=None, repr=False)  # cluster secret, or @path to it
    nats_tls_ca: str | None = None  # CA file that NATS servers' certificates must chain to
    nats_tls_cert: str | None = None  # this client's certificate (when servers verify clients)
    nats_tls_key: str | None = None  # and its key
    api_keys: str | None = field(default=None, repr=False)  # key or key:tenant, comma-separated
    kv_codec: str = "raw"  # how new chunks are stored: raw (exact) or int8 (half of fp16, lossy)
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    log_format: str = "auto"  # json, console or auto (console on a terminal)
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from CAKE_* variables, then the given overrides (None means: not given)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(env_var(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings: {sorted(unknown)}")
        return cls(**values).validated()

    def validated(self) -> Settings:
        """self, or ConfigError naming the first bad value."""
        positive = (
            "chunk_tokens",
            "request_timeout_s",
            "rpc_timeout_s",
            "heartbeat_s",
            "telemetry_s",
            "fetch_timeout_s",
            "fetch_concurrency",
            "token_budget",
            "max_tokens_limit",
            "max_waiting",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{env_var(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"CAKE_PORT must be a TCP port (0: any free one), got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(
                f"CAKE_METRICS_PORT must be a TCP port or 0 (none), got {self.metrics_port}"
            )
        if self.target_itl_ms is not None and not self.target_itl_ms > 0:
            raise ConfigError(f"CAKE_TARGET_ITL_MS must be positive, got {self.target_itl_ms}")
        if self.kv_memory_gb is not None and self.kv_memory_gb <= 0:
            raise ConfigError(f"CAKE_KV_MEMORY_GB must be positive, got {self.kv_memory_gb}")
        if self.store_cache_gb is not None and self.store_cache_gb <= 0:
            raise ConfigError(f"CAKE_STORE_CACHE_GB must be positive, got {self.store_cache_gb}")
        if self.s3_part_mb < 0:
            raise ConfigError(f"CAKE_S3_PART_MB must be >= 0 (0: one GET), got {self.s3_part_mb}")
        if self.link_probe_s < 0:
            raise ConfigError(f"CAKE_LINK_PROBE_S must be >= 0 (0: never), got {self.link_probe_s}")
        if not 0 < self.decode_share <= 1:
            raise ConfigError(f"CAKE_DECODE_SHARE must be in (0, 1], got {self.decode_share}")
        if not 0 <= self.skip_head_ratio < 1:
            raise ConfigError("CAKE_SKIP_HEAD_RATIO must be in [0, 1) (0 never skips the head)")
        if self.split_cost_chunks < 0:
            raise ConfigError(f"CAKE_SPLIT_COST_CHUNKS must be >= 0, got {self.split_cost_chunks}")
        if self.kv_codec not in CODECS:
            raise ConfigError(f"CAKE_KV_CODEC must be one of {', '.join(CODECS)}")
        if self.log_format not in ("json", "console", "auto"):
            raise ConfigError("CAKE_LOG_FORMAT must be json, console or auto")
        if self.token_budget < self.chunk_tokens:
            raise ConfigError("CAKE_TOKEN_BUDGET must be at least CAKE_CHUNK_TOKENS")
        if self.store_bandwidth_trace and self.store_bandwidth_mbps is not None:
            raise ConfigError(
                "CAKE_STORE_BANDWIDTH_MBPS and CAKE_STORE_BANDWIDTH_TRACE both limit the link: "
                "set one"
            )
        for name in ("store_bandwidth_period_s", "store_bandwidth_epoch"):
            if getattr(self, name) is not None and not self.store_bandwidth_trace:
                raise ConfigError(f"{env_var(name)} needs CAKE_STORE_BANDWIDTH_TRACE")
        self.bandwidth_trace()  # a trace that cannot be read fails at start, not at a read
        return self

    def bandwidth_trace(self) -> BandwidthTrace | None:
        """The emulated link's bandwidth over time (CAKE_STORE_BANDWIDTH_MBPS: constant), or
        None: the store's own speed."""
        if self.store_bandwidth_trace:
            trace, period = self.store_bandwidth_trace, self.store_bandwidth_period_s
            return BandwidthTrace.parse(trace, period, self.store_bandwidth_epoch)
        if self.store_bandwidth_mbps is not None:
            if not self.store_bandwidth_mbps > 0:
                raise ConfigError("CAKE_STORE_BANDWIDTH_MBPS must be positive")
            return BandwidthTrace(((0.0, self.store_bandwidth_mbps),))
        return None

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes).validated()

    @property
    def telemetry_stale_s(self) -> float:
        """How long a node's last telemetry counts: three periods (then it is taken as gone)."""
        return 3 * self.telemetry_s

    @property
    def kv_memory_bytes(self) -> int | None:
        """The compute replica's KV memory budget, if set."""
        return None if self.kv_memory_gb is None else int(self.kv_memory_gb * 2**30)

    def api_key_tenants(self) -> dict[str, str]:
        """CAKE_API_KEYS as key -> tenant: comma-separated `key` or `key:tenant` entries, or
        @path to a file of them (one or more a line; # starts a comment). A key without a
        tenant is a tenant of its own. Empty: no keys (requests need none)."""
        entries: list[str] = []
        for entry in filter(None, (e.strip() for e in (self.api_keys or "").split(","))):
            if not entry.startswith("@"):
                entries.append(entry)
                continue
            try:
                lines = Path(entry[1:]).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"CAKE_API_KEYS: cannot read {entry[1:]}: {exc}") from None
            for line in lines:
                entries += [e.strip() for e in line.split("#", 1)[0].split(",") if e.strip()]
        tenants: dict[str, str] = {}
        for entry in entries:
            key, _, tenant = entry.partition(":")
            key, tenant = key.strip(), tenant.strip()
            if not key or (":" in entry and not tenant):
                raise ConfigError(f"CAKE_API_KEYS: {entry[:8]!r}... is not `key` or `key:tenant`")
            tenants[key] = tenant or "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return tenants

    def nats_tls(self) -> ssl.SSLContext | None:
        """The TLS context for NATS (None: plain TCP unless the URL says tls://, which then
        verifies against the system's CAs)."""
        if self.nats_tls_key and not self.nats_tls_cert:
            raise ConfigError("CAKE_NATS_TLS_KEY is set without CAKE_NATS_TLS_CERT")
        if not (self.nats_tls_ca or self.nats_tls_cert):
            return None
        try:
            context = ssl.create_default_context(cafile=self.nats_tls_ca)
            if self.nats_tls_cert:
                context.load_cert_chain(self.nats_tls_cert, self.nats_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"CAKE_NATS_TLS_*: cannot load the certificates: {exc}") from None
        return context

    def kv_secret_bytes(self) -> bytes | None:
        """The cluster secret that stored chunks are MAC'd with (CAKE_KV_SECRET: the secret,
        or @path to a file holding it), or None."""
        if not self.kv_secret:
            return None
        if not self.kv_secret.startswith("@"):
            return self.kv_secret.encode()
        try:
            secret = Path(self.kv_secret[1:]).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"CAKE_KV_SECRET: cannot read {self.kv_secret[1:]}: {exc}") from None
        if not secret:
            raise ConfigError(f"CAKE_KV_SECRET: {self.kv_secret[1:]} is empty")
        return secret

    @property
    def store_capacity_bytes(self) -> int | None:
        """The local store's byte capacity, if any."""
        return None if self.store_capacity_gb is None else int(self.store_capacity_gb * 1e9)

    def store_cache_bytes(self) -> int | None:
        """The near tier's byte capacity, if any."""
        return None if self.store_cache_gb is None else int(self.store_cache_gb * 1e9)


def env_var(name: str) -> str:
    """The environment variable of a settings field."""
    return f"CAKE_{name.upper()}"


ENV_VARS = frozenset(env_var(f.name) for f in fields(Settings))


def _parse(name: str, kind: Any, raw: str) -> Any:
    kind = str(kind)
    if kind.startswith("bool"):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{env_var(name)}={raw!r} is not a boolean (use 1/0, true/false)")
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{env_var(name)}={raw!r} is not a number") from None
    return raw
