"""The serving benchmark's output: serve.json, serve.png and a terminal table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


COLUMNS = (
    ("req/s", 6), ("sent", 4), ("ok", 4), ("429", 4), ("fail", 4), ("TTFT p50", 8),
    ("p90", 6), ("p99", 6), ("ITL p50", 7), ("p90", 5), ("p99", 5), ("E2E p50", 7),
    ("p99", 6), ("done/s", 6), ("tok/s", 6), ("RSS MiB", 7),
)  # fmt: skip


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per arrival rate: TTFT and E2E in seconds, inter-token latency in ms."""
    head = " ".join(f"{name:>{width}}" for name, width in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        t, i, e = r["ttft_s"], r["itl_s"], r["e2e_s"]
        rss = r["peak_rss_mib"]
        cells = [
            f"{r['offered_rps']:.2f}", r["sent"], r["completed"], r["rejected_429"], r["failed"],
            _s(t["p50"]), _s(t["p90"]), _s(t["p99"]), _ms(i["p50"]), _ms(i["p90"]), _ms(i["p99"]),
            _s(e["p50"]), _s(e["p99"]), f"{r['throughput_rps']:.2f}", f"{r['output_tok_s']:.1f}",
            "-" if rss is None else f"{rss:.0f}",
        ]  # fmt: skip
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    return "\n".join(lines)


def scenario_lines(found: dict[str, dict[str, Any]]) -> str:
    """The two fixed scenarios, one line each."""
    a, b = found["fresh_under_decode"], found["concurrent_16"]
    return "\n".join([
        f"fresh {a['prompt_tokens']}-token prompt under {a['decoders']} decoding: TTFT "
        f"{a['loaded_ttft_median_s']:.3f}s vs {a['idle_ttft_median_s']:.3f}s idle = "
        f"{a['ratio']:.2f}x (target <= {a['target_max']:g}x)",
        f"{b['clients']} concurrent short requests: {b['together']['output_tok_s']:.1f} tok/s vs "
        f"{b['one_by_one']['output_tok_s']:.1f} one at a time = {b['ratio']:.2f}x "
        f"(target >= {b['target_min']:g}x)",
    ])  # fmt: skip


def plot_ttft(rows: Sequence[dict[str, Any]], capacity_rps: float | None, path: Path) -> None:
    """TTFT p50 and p99 against the offered arrival rate."""
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["offered_rps"] for r in rows]
    for q, style in (("p50", "o-"), ("p99", "s--")):
        points = [(a, r["ttft_s"][q]) for a, r in zip(x, rows, strict=True) if r["ttft_s"][q]]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"TTFT {q}")
    if capacity_rps:
        ax.axvline(capacity_rps, color="k", ls=":", label="1 / service time")
    ax.set_xlabel("arrival rate (requests/s, Poisson)")
    ax.set_ylabel("TTFT (s)")
    ax.set_yscale("log")
    seconds = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(seconds)
    ax.yaxis.set_minor_formatter(seconds)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    """serve.json and serve.png under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(results, indent=2))
    plot_ttft(results["rates"], results["summary"].get("capacity_rps"), out / "serve.png")
