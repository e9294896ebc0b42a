"""The fluctuating benchmark's output: fluctuating.json, fluctuating.png and a terminal table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.fluctuating import MODES
from bench.report import vs_best
from shared.core.bandwidth import BandwidthTrace

LINES = (*MODES, "oracle")


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per request: when, the link, each mode's TTFT (* sent late: its mode's last
    request overran this one's second), best/cake and the meets."""
    head = f"{'#':>3} {'t (s)':>6} {'MB/s':>7} {'busy':>4} " + " ".join(f"{m:>11}" for m in LINES)
    head += f" {'best/cake':>9} {'meet':>5} {'static':>6} {'oracle':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["ttft_s"]
        meet = r["meet_chunk"]
        lines.append(
            f"{r['request']:>3} {r['phase_s']['cake']:>6.1f} {r['link_MBps']:>7.1f} "
            f"{'yes' if r['disturbed'] else '':>4} "
            + " ".join(f"{t[m]:>10.3f}{'*' if m in r.get('late', ()) else ' '}" for m in LINES)
            + f" {vs_best(t):>9.2f} {meet['cake']:>5}"
            f" {meet['cake_static']:>6} {r['oracle_meet_chunk']:>6}"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """As the paper's Fig. 5: TTFT of each request over the period, one line per mode, and the
    link's bandwidth underneath (the disturbed window shaded)."""
    rows, trace_info = results["rows"], results["trace"]
    trace = BandwidthTrace(tuple(map(tuple, trace_info["steps"])), trace_info["period_s"])
    period = trace_info["period_s"]
    begin, end = (f * period for f in results["config"]["disturbed"])
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    styles = ("o-", "s-", "D-", "^-", "k--")
    for mode, style in zip(LINES, styles, strict=True):
        x = [r["phase_s"]["cake" if mode == "oracle" else mode] for r in rows]
        top.plot(x, [r["ttft_s"][mode] for r in rows], style, label=mode, markersize=4)
    top.set_ylabel("TTFT (s)")
    top.set_title(f"{results['calibration']['context']} tokens on a changing link")
    grid = [period * i / 600 for i in range(601)]
    bottom.step(grid, [trace.rate_MBps(t) for t in grid], where="post", color="tab:gray")
    bottom.set_ylabel("link MB/s")
    bottom.set_xlabel("seconds into the trace's period")
    for ax in (top, bottom):
        ax.axvspan(begin, end, color="tab:red", alpha=0.08, label="compute disturbed")
        ax.grid(alpha=0.3)
    top.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    """fluctuating.json and fluctuating.png under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fluctuating.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "fluctuating.png")
