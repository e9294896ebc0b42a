"""`cake bench --fluctuating`: its trace, phases and summary on fixed numbers, and one tiny real
run end to end."""

from __future__ import annotations

import asyncio
import itertools
import json
from functools import partial
from pathlib import Path

import pytest

from bench import fluctuating_report
from bench.fluctuating import (
    MODES,
    FluctuatingConfig,
    disturb_schedule,
    run_fluctuating,
    slowest_s,
    summarize,
)
from bench.main import bench_main, fluctuating_config_from_args
from services.launcher.cli import build_parser
from shared.core.errors import ConfigError


def test_the_trace_is_in_units_of_the_compute_rate_and_requests_avoid_its_steps() -> None:
    config = FluctuatingConfig(period_s=60.0, requests=12)
    trace = config.trace(kv_rate_MBps=10.0)
    assert trace.period_s == 60.0
    assert [trace.rate_MBps(t) for t in (0, 11, 21, 31, 41, 51, 61)] == [
        40, 10, 2.5, 20, 5, 80, 40,
    ]  # fmt: skip
    rates = [r for _, r in config.link]
    assert max(rates) / min(rates) >= 8  # the link steps over at least 8x
    marks = config.marks()
    assert marks[0] == 2.5 and marks[-1] == 57.5 and len(marks) == 12
    steps = [t for t, _ in trace.steps]
    assert min(abs(p - s) for p in marks for s in steps) >= 2.5  # none sent on a step
    assert [config.is_disturbed(p) for p in (26.9, 27.0, 44.9, 45.0)] == [False, True, True, False]


def test_requests_skip_the_marks_at_which_the_slowest_mode_may_still_be_running() -> None:
    """Load-only at 0.25x takes four compute times: no mode sends late onto another link."""
    config = FluctuatingConfig.quick()  # marks every 3 s; the link at 0.25x from 20 s to 30 s
    trace = config.trace(kv_rate_MBps=10.0)
    calibration = {"kv_bytes": 10e6, "compute_ttft_s": 1.0, "fixed_overhead_s": 0.05}
    lasts = partial(slowest_s, trace, calibration)
    assert lasts(4.5) == pytest.approx(1.25)  # 4x: compute is the slowest
    assert lasts(22.5) == pytest.approx(1.25 * (0.05 + 4.0))  # 0.25x: load-only
    assert lasts(19.5) == pytest.approx(1.25 * (0.05 + 0.5 + 2.0))  # 5 MB at 1x, 5 at 0.25x
    phases = config.phases(lasts)
    assert set(phases) < set(config.marks())
    assert phases[:8] == [1.5, 4.5, 7.5, 10.5, 13.5, 16.5, 19.5, 25.5]  # 22.5 skipped
    assert all(b >= a + lasts(a) for a, b in itertools.pairwise(phases))
    assert phases[-1] == 58.5  # the fast tail keeps every mark


def test_the_disturbance_is_a_fixed_schedule_in_its_window() -> None:
    """Open loop from the window's start: the same seconds in every mode's period."""
    assert disturb_schedule(27.0, 45.0, 2.5) == [27.0 + 2.5 * j for j in range(8)]
    assert disturb_schedule(27.0, 45.0, 6.0) == [27.0, 33.0, 39.0]  # none at the window's end
    assert disturb_schedule(27.0, 27.0, 1.0) == []


def row(k: int, compute: float, load: float, cake: float, static: float, oracle: float) -> dict:
    ttft = {"compute": compute, "load": load, "cake": cake, "cake_static": static,
            "oracle": oracle}  # fmt: skip
    return {"request": k, "phase_s": dict.fromkeys(MODES, 1.5 * k), "link_MBps": 10.0,
            "disturbed": k == 1, "ttft_s": ttft, "oracle_meet_chunk": 2,
            "meet_chunk": {"cake": 2, "cake_static": 3}}  # fmt: skip


def test_summary_is_what_the_issue_defines() -> None:
    rows = [row(0, 1.0, 2.0, 0.5, 1.0, 0.5), row(1, 2.0, 1.0, 1.25, 1.5, 1.0)]
    s = summarize(rows)
    assert s["cake_vs_best_mean"] == pytest.approx((2.0 + 0.8) / 2)  # min(compute, load) / cake
    assert s["cake_vs_best_worst"] == pytest.approx(0.8)
    assert s["controllers_gain"] == pytest.approx(1.25 / 0.875)  # mean static / mean cake
    assert s["cake_over_oracle_mean"] == pytest.approx((1.0 + 1.25) / 2)
    assert "best/cake" in fluctuating_report.table(rows)


def test_a_request_sent_late_is_marked_and_still_compared() -> None:
    """Its mode's last request overran its second: marked, and counted as the issue defines."""
    late = {**row(0, 2.0, 0.5, 1.0, 1.0, 1.0), "late": ["load"]}
    assert summarize([late])["cake_vs_best_mean"] == pytest.approx(0.5)
    assert "0.500*" in fluctuating_report.table([late])


def test_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "--fluctuating", "--quick", "--contexts", "1024"])
    config = fluctuating_config_from_args(args)
    assert (config.context, config.period_s) == (1024, FluctuatingConfig.quick().period_s)
    for extra in (["--serve"], ["--ceiling"], ["--rates", "1"], ["--io-ratios", "1"]):
        with pytest.raises(ConfigError):
            bench_main(parser.parse_args(["bench", "--fluctuating", *extra]))


def test_a_tiny_fluctuating_run_end_to_end(tmp_path: Path) -> None:
    config = FluctuatingConfig(context=512, period_s=8.0, requests=4)
    results = asyncio.run(run_fluctuating(config))
    fluctuating_report.write_report(results, tmp_path)
    saved = json.loads((tmp_path / "fluctuating.json").read_text())
    assert saved["summary"] == results["summary"] and (tmp_path / "fluctuating.png").exists()
    rows = results["rows"]
    assert [r["request"] for r in rows] == list(range(len(rows))) and rows
    calibration = results["calibration"]
    chunks, rate = calibration["chunks"], calibration["kv_rate_MBps"]
    assert calibration["disturb_every_s"] == pytest.approx(2 * calibration["compute_ttft_s"], 0.01)
    trace = config.trace(rate)
    phases = config.phases(partial(slowest_s, trace, calibration))
    assert [r["slot_s"] for r in rows] == phases
    for r, phase in zip(rows, phases, strict=True):
        assert all(r["ttft_s"][m] > 0 for m in (*MODES, "oracle"))
        assert all(abs(r["phase_s"][m] - phase) < 0.5 for m in MODES)  # the same moment
        assert r["link_MBps"] == pytest.approx(trace.rate_MBps(phase), rel=0.01)
        assert r["disturbed"] == config.is_disturbed(phase)
        assert r["late"] == []  # nothing overran its slot
        assert all(0 <= m <= chunks for m in r["meet_chunk"].values())
    begin, end = (f * config.period_s for f in config.disturbed)
    schedule = disturb_schedule(begin, end, calibration["disturb_every_s"])
    for mode in MODES:  # every background request went out on schedule; none was refused
        assert results["disturbance"][mode]["sent"] == len(schedule) >= 1
        assert results["disturbance"][mode]["failed"] == 0
    assert set(results["summary"]) == {
        "cake_vs_best_mean", "cake_vs_best_worst", "controllers_gain", "cake_over_oracle_mean",
    }  # fmt: skip
