"""Benchmark output: the summary, results.json, a terminal table and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODES = ("compute", "load", "cake", "oracle")


def vs_best(ttft: Mapping[str, float]) -> float:
    """Cake against the better single method: min(compute, load) / cake."""
    return min(ttft["compute"], ttft["load"]) / ttft["cake"]


def summarize(rows: Sequence[dict[str, Any]], pipeline_ratio: float) -> dict[str, float | None]:
    """The headline ratios over all cells (at_balance is None without an io_ratio 1 cell)."""
    ratios = [vs_best(r["ttft_s"]) for r in rows]
    at_balance = [vs_best(r["ttft_s"]) for r in rows if r["io_ratio"] == 1.0]
    over_split = [r["ttft_s"]["cake"] / r["best_split_s"] for r in rows if "best_split_s" in r]
    return {
        "cake_over_oracle_max": max(r["ttft_s"]["cake"] / r["ttft_s"]["oracle"] for r in rows),
        "cake_over_best_split_at_balance": max(over_split) if over_split else None,
        "cake_vs_best_baseline_min": min(ratios),
        "cake_vs_best_baseline_at_balance": min(at_balance) if at_balance else None,
        "pipeline_overhead": pipeline_ratio,
    }


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of the cells."""
    head = f"{'context':>7} {'io':>5} {'MB/s':>7} " + " ".join(f"{m:>8}" for m in MODES)
    head += f" {'best/cake':>9} {'meet':>5} {'oracle':>6} {'chunks':>6} {'measured best split':>19}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["ttft_s"]
        measured = (
            f"{r['best_split_s']:>12.3f} at {r['best_split_meet_chunk']:>3}"
            if "best_split_s" in r
            else "-"
        )
        lines.append(
            f"{r['context']:>7} {r['io_ratio']:>5g} {r['bandwidth_MBps']:>7.1f} "
            + " ".join(f"{t[m]:>8.3f}" for m in MODES)
            + f" {vs_best(t):>9.2f} {r['meet_chunk']:>5} {r['oracle_meet_chunk']:>6}"
            + f" {r['chunks']:>6} {measured:>19}"
        )
    return "\n".join(lines)


def plot_ttft(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """TTFT against io_ratio, one panel per context, one line per mode."""
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, ctx in zip(axes[0], contexts, strict=True):
        mine = sorted((r for r in rows if r["context"] == ctx), key=lambda r: r["io_ratio"])
        x = [r["io_ratio"] for r in mine]
        for mode, style in zip(MODES, ("o-", "s-", "D-", "k--"), strict=True):
            ax.plot(x, [r["ttft_s"][mode] for r in mine], style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("storage bandwidth / compute KV rate (io_ratio)")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"{ctx} tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(events: Sequence[dict[str, Any]], chunks: int, path: Path) -> None:
    """The compute pointer rising and the load pointer falling to where they meet."""
    fig, ax = plt.subplots(figsize=(6, 4))
    computed = [(0.0, 0)] + [(e["t"], e["upto"]) for e in events if e["kind"] == "computed"]
    loaded: set[int] = set()
    frontier, falling = chunks, [(0.0, chunks)]
    for e in sorted((e for e in events if e["kind"] == "loaded"), key=lambda e: e["t"]):
        loaded.add(e["index"])
        while frontier - 1 in loaded:
            frontier -= 1
        falling.append((e["t"], frontier))
    ax.step(*zip(*computed, strict=True), where="post", label="compute pointer (chunks computed)")
    ax.step(*zip(*falling, strict=True), where="post", label="load pointer (lowest loaded run)")
    for e in events:
        if e["kind"] == "first_token":
            ax.axvline(e["t"], color="k", ls=":", label=f"first token (meet at chunk {e['meet']})")
    ax.set_xlabel("seconds since the request")
    ax.set_ylabel("chunk index")
    ax.set_ylim(-0.5, chunks + 0.5)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> dict[str, float | None]:
    """results.json, ttft.png, timeline.png under out; the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results["rows"], results["pipeline"]["ratio"])
    results["summary"] = summary
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_ttft(results["rows"], out / "ttft.png")
    if results.get("timeline"):
        chunks = max(r["chunks"] for r in results["rows"])
        plot_timeline(results["timeline"], chunks, out / "timeline.png")
    return summary
