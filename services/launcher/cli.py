"""The `cake` command: `cake up` runs the whole local stack, `cake serve SERVICE` runs one."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Sequence

from services.launcher.stack import SERVICES, run_stack
from shared.core.errors import ConfigError
from shared.runtime.config import Settings
from shared.runtime.service import Builder, serve


def _settings_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override CAKE_* environment variables (same names, dashes for underscores)."""
    p.add_argument("--nats-url", help="NATS server URL (cake up starts one when not given)")
    p.add_argument("--model", help='"default", a local model directory or a hub id')
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument("--store", help="a path, file:///path, s3://bucket/prefix or memory://")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (MinIO, moto, ...)")
    p.add_argument("--s3-region")
    p.add_argument("--store-capacity-gb", type=float, help="local store capacity (LRU eviction)")
    p.add_argument("--staging-dir", help="node-local directory shared by loader and compute")
    p.add_argument("--chunk-tokens", type=int, help="tokens per stored chunk")
    p.add_argument("--host", help="gateway listen address")
    p.add_argument("--port", type=int, help="gateway port (its /metrics too)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="port of a service's /metrics (cake up: merger; compute +1, loader +2); 0: none",
    )
    p.add_argument("--log-format", choices=["json", "console", "auto"])
    p.add_argument("--kv-memory-gb", type=float, help="KV memory budget of a compute replica")
    p.add_argument("--max-waiting", type=int, help="requests queued beyond those running")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `cake` (tests check docker-compose commands against it)."""
    parser = argparse.ArgumentParser(prog="cake", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run nats-server (unless --nats-url) and all four services")
    _settings_flags(up)
    up.add_argument(
        "--api-key", action="append", metavar="KEY[:TENANT]",
        help="require this API key (repeat for more; added to CAKE_API_KEYS)",
    )  # fmt: skip
    up.add_argument(
        "--nodes", type=int, default=1, metavar="N",
        help="run N nodes (a compute and a loader each) over a cluster of 3 nats-servers",
    )  # fmt: skip
    bench = sub.add_parser("bench", help="TTFT of compute-only, load-only, Cake and the oracle")
    bench.add_argument("--quick", action="store_true", help="about 3 minutes on 2 CPU cores")
    bench.add_argument("--serve", action="store_true", help="the serving benchmark (serve.json)")
    bench.add_argument(
        "--ceiling", action="store_true", help="storage rate vs what the loader delivers"
    )
    bench.add_argument(
        "--fluctuating", action="store_true",
        help="TTFT on a link that follows a trace, compute disturbed part of the time",
    )  # fmt: skip
    bench.add_argument("--rates", type=float, nargs="+", help="--serve: arrival rates, req/s")
    bench.add_argument("--nodes", type=int, help="--serve: nodes of the stack (default 1)")
    bench.add_argument("--out", default="bench-results", help="where results go")
    bench.add_argument("--contexts", type=int, nargs="+", help="prompt lengths in tokens")
    bench.add_argument("--io-ratios", type=float, nargs="+", help="bandwidth / compute KV rate")
    bench.add_argument("--reps", type=int, help="timed repetitions per mode and cell")
    bench.add_argument("--model", help="model to benchmark (default: the embedded one)")
    bench.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    bench.add_argument("--device", help="torch device, e.g. cpu or cuda")
    serve = sub.add_parser("serve", help="run one service (what a container runs)")
    serve.add_argument("service", choices=SERVICES)
    _settings_flags(serve)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings overridden by the flags that were given."""
    names = (
        "nats_url",
        "model",
        "dtype",
        "device",
        "store",
        "s3_endpoint",
        "s3_region",
        "store_capacity_gb",
        "staging_dir",
        "chunk_tokens",
        "host",
        "port",
        "metrics_port",
        "log_format",
        "kv_memory_gb",
        "max_waiting",
    )
    keys = ",".join([os.environ.get("CAKE_API_KEYS", ""), *(getattr(args, "api_key", None) or [])])
    return Settings.from_env(
        **{n: getattr(args, n, None) for n in names}, api_keys=keys.strip(",") or None
    )


def builder(service: str) -> Builder:
    """How to build a service (imported only when asked: compute brings torch along)."""
    if service not in SERVICES:
        raise ConfigError(f"unknown service {service!r}; use one of {', '.join(SERVICES)}")
    module = importlib.import_module(f"services.{service}.service")
    return module.build


async def serve_until_signalled(service: str, settings: Settings) -> None:
    """Run one service until SIGINT/SIGTERM, then shut it down in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve(service, builder(service), settings, stop)


def run_bench(args: argparse.Namespace) -> int:
    """`cake bench`, when the benchmark and its extra are installed."""
    try:
        from bench.main import bench_main
    except ImportError as exc:
        raise ConfigError(
            f"cake bench needs the benchmark package and its extra ({exc.name} is missing): "
            "pip install 'cake[bench]' from a checkout"
        ) from exc
    return bench_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cake` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return run_bench(args)
        settings = settings_from_args(args)
        if args.command == "serve":
            asyncio.run(serve_until_signalled(args.service, settings))
        elif args.command == "up":
            return run_stack(settings, start_nats=args.nats_url is None, nodes=args.nodes)
    except ConfigError as exc:
        print(f"cake: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
