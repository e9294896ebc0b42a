"""`cake bench` entry point."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from pathlib import Path

from bench.report import table, write_report
from bench.sweep import BenchConfig, run_bench


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """--quick's defaults (or the full ones), overridden by the flags given."""
    config = BenchConfig.quick() if args.quick else BenchConfig()
    changes = {
        "contexts": args.contexts, "io_ratios": args.io_ratios, "reps": args.reps,
        "model": args.model, "dtype": args.dtype, "device": args.device,
    }  # fmt: skip
    return dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})


def bench_main(args: argparse.Namespace) -> int:
    """Run, print the table and summary, write results under --out."""
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
