"""`cake bench` entry point: the TTFT sweep, or --serve, --ceiling or --fluctuating."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

from bench import fluctuating_report, serve_report
from bench.ceiling import CeilingConfig, run_ceiling
from bench.fluctuating import FluctuatingConfig, run_fluctuating
from bench.report import table, write_report
from bench.serve import ServeConfig, run_serve
from bench.sweep import BenchConfig, run_bench
from shared.core.errors import ConfigError
from shared.runtime.observability import configure_logging


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """--quick's defaults (or the full ones), overridden by the flags given."""
    config = BenchConfig.quick() if args.quick else BenchConfig()
    changes = {
        "contexts": args.contexts, "io_ratios": args.io_ratios, "reps": args.reps,
        "model": args.model, "dtype": args.dtype, "device": args.device,
    }  # fmt: skip
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The serving benchmark's --quick defaults (or the full ones), overridden by the flags."""
    sweep_only = [f"--{n.replace('_', '-')}" for n in ("contexts", "io_ratios")
                  if getattr(args, n) is not None]  # fmt: skip
    if sweep_only:
        raise ConfigError(f"{', '.join(sweep_only)}: only for the TTFT sweep, not with --serve")
    config = ServeConfig.quick() if args.quick else ServeConfig()
    changes = {
        "rates": args.rates, "reps": args.reps, "model": args.model, "dtype": args.dtype,
        "device": args.device, "nodes": args.nodes,
    }  # fmt: skip
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def bench_main(args: argparse.Namespace) -> int:
    """Run, print the table and summary, write results under --out."""
    configure_logging("bench", "json", "warning")
    chosen = [f"--{n}" for n in ("serve", "ceiling", "fluctuating") if getattr(args, n)]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} are separate benchmarks: choose one")
    if args.serve:
        return serve_main(serve_config_from_args(args), Path(args.out))
    if args.ceiling:
        return ceiling_main(ceiling_config_from_args(args), Path(args.out))
    if args.fluctuating:
        return fluctuating_main(fluctuating_config_from_args(args), Path(args.out))
    if args.rates is not None or args.nodes is not None:
        raise ConfigError("--rates and --nodes: only with --serve")
    config = config_from_args(args)
    results = asyncio.run(run_bench(config))
    results["config"] = dataclasses.asdict(config)
    out = Path(args.out)
    summary = write_report(results, out)
    print(table(results["rows"]))
    pipe = results["pipeline"]
    print(
        f"\npipeline overhead (services / one process, {pipe['context']} tokens, io_ratio 1): "
        f"{pipe['ratio']:.3f}"
    )
    print(json.dumps(summary, indent=2))
    print(f"results: {out / 'results.json'}, plots: {out / 'ttft.png'}, {out / 'timeline.png'}")
    return 0


def refuse_flags(args: argparse.Namespace, names: tuple[str, ...], benchmark: str) -> None:
    """ConfigError naming the given flags that do not apply to this benchmark."""
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not for {benchmark}")


def ceiling_config_from_args(args: argparse.Namespace) -> CeilingConfig:
    """The ceiling benchmark's settings from the flags that apply to it."""
    refuse_flags(args, ("contexts", "io_ratios", "rates", "nodes"), "--ceiling")
    changes = {"reps": args.reps, "model": args.model, "dtype": args.dtype, "device": args.device}
    config = CeilingConfig()
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def ceiling_main(config: CeilingConfig, out: Path) -> int:
    """The ceiling benchmark: run, write ceiling.json, print both stores' lines."""
    results = asyncio.run(run_ceiling(config))
    results["config"] = dataclasses.asdict(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, r in (("local", results), ("s3", results["s3"])):
        cold = "-" if r["raw_MBps_cold"] is None else f"{r['raw_MBps_cold']:.0f}"
        print(
            f"{name:5s} raw warm {r['raw_MBps_warm']:7.0f} MB/s  cold {cold:>5s} MB/s  "
            f"delivered {r['delivered_MBps']} MB/s  ratio {r['ratio']}  "
            f"TTFT / ideal {r['load_ttft_over_ideal_warm']} warm, "
            f"{r['load_ttft_over_ideal_cold'] or '-'} cold  "
            f"({r['chunks']} chunks, {r['bytes'] / 1e6:.0f} MB)"
        )
    print(f"results: {out / 'ceiling.json'}")
    return 0


def serve_main(config: ServeConfig, out: Path) -> int:
    """The serving benchmark: run, write serve.json and serve.png, print the table."""
    results = asyncio.run(run_serve(config))
    results = {"config": dataclasses.asdict(config), **results}
    serve_report.write_report(results, out)
    cal = results["calibration"]
    print(
        f"service time alone {cal['service_s']:.2f}s (long {cal['long_s']:.2f}s, short "
        f"{cal['short_s']:.2f}s, {cal['max_tokens']} tokens): capacity ~{cal['capacity_rps']:.2f}"
        " req/s one at a time"
    )
    print(serve_report.table(results["rates"]))
    print(serve_report.scenario_lines(results["scenarios"]))
    print(json.dumps(results["summary"], indent=2))
    print(f"results: {out / 'serve.json'}, plot: {out / 'serve.png'}")
    return 0


def fluctuating_config_from_args(args: argparse.Namespace) -> FluctuatingConfig:
    """The fluctuating benchmark's --quick defaults (or the full ones), overridden by the
    flags that apply to it (one context: the first of --contexts)."""
    refuse_flags(args, ("io_ratios", "rates", "reps", "nodes"), "--fluctuating")
    config = FluctuatingConfig.quick() if args.quick else FluctuatingConfig()
    changes = {"model": args.model, "dtype": args.dtype, "device": args.device,
               "context": args.contexts[0] if args.contexts else None}  # fmt: skip
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def fluctuating_main(config: FluctuatingConfig, out: Path) -> int:
    """The fluctuating benchmark: run, write fluctuating.json and .png, print the table."""
    results = asyncio.run(run_fluctuating(config))
    fluctuating_report.write_report(results, out)
    print(fluctuating_report.table(results["rows"]))
    print(json.dumps(results["summary"], indent=2))
    print(f"results: {out / 'fluctuating.json'}, plot: {out / 'fluctuating.png'}")
    return 0
