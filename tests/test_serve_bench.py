"""`cake bench --serve`: its arithmetic on synthetic records, the Poisson schedule and the
request mix, and one tiny real run end to end."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import pytest

from bench.client import Stream
from bench.main import serve_config_from_args, serve_main
from bench.serve import ServeConfig
from bench.serve_report import table
from bench.serve_stats import Record, concurrent, fresh_under_decode, percentile, rate_row, side
from bench.workload import Mix, documents, poisson_arrivals, request_mix
from services.launcher.cli import build_parser
from shared.core.errors import ConfigError


def record(arrival: float, ttft: float, e2e: float, tokens: int, status: int = 200,
           itl: tuple[float, ...] = (), error: str | None = None) -> Record:  # fmt: skip
    return Record("short", arrival, status, ttft, itl, e2e, 100, tokens, 0, error)


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # 3 + 0.7 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


def test_rate_row_latencies_throughput_and_errors() -> None:
    records = [
        record(0.0, 0.1, 1.0, 10, itl=(0.01, 0.03)),
        record(0.5, 0.2, 2.0, 20, itl=(0.02,)),
        record(1.0, 0.3, 4.0, 30),  # ends last, at 5.0
        record(1.5, 0.0, 0.01, 0, status=429, error="busy"),
        record(2.0, 0.0, 0.01, 0, status=503, error="down"),
        record(2.5, 0.1, 0.5, 3, error='{"code": "internal"}'),  # an error event after a 200
    ]
    row = rate_row(records, offered_rps=2.0, peak_rss_mib=512.0)
    assert (row["sent"], row["completed"], row["rejected_429"], row["failed"]) == (6, 3, 1, 2)
    assert row["errors"] == {"429": 1, "503": 1, "stream_error": 1}
    assert row["ttft_s"] == pytest.approx({"p50": 0.2, "p90": 0.28, "p99": 0.298})
    assert row["itl_s"]["p50"] == pytest.approx(0.02)  # pooled: 0.01, 0.02, 0.03
    assert row["e2e_s"] == pytest.approx({"p50": 2.0, "p99": 3.96})
    assert row["tpot_s"]["p50"] == pytest.approx(0.1)  # median of 0.9/9, 1.8/19, 3.7/29
    assert row["window_s"] == pytest.approx(5.0)  # first arrival 0.0, last end 5.0
    assert row["throughput_rps"] == pytest.approx(3 / 5.0)
    assert row["output_tok_s"] == pytest.approx(60 / 5.0)  # completed requests' tokens only
    assert row["arrived_rps"] == pytest.approx(6 / 2.5)
    assert row["peak_rss_mib"] == 512.0
    assert "0.20" in table([row]).splitlines()[2]


def test_record_of_a_stream() -> None:
    usage = {"prompt_tokens": 900, "completion_tokens": 3,
             "prompt_tokens_details": {"cached_tokens": 768}}  # fmt: skip
    stream = Stream(200, first_event_s=0.4, text_s=[0.5, 0.6, 0.9], end_s=1.0,
                    final={"usage": usage})  # fmt: skip
    r = Record.of(stream, "long", arrival_s=2.0)
    assert r.ok and r.ttft_s == 0.5 and r.itl_s == pytest.approx((0.1, 0.3))
    assert (r.completion_tokens, r.cached_tokens, r.prompt_tokens) == (3, 768, 900)
    assert r.end_s == 3.0
    refused = Record.of(Stream(429, end_s=0.01, error="busy"), "short", 0.0)
    assert not refused.ok and refused.error_key == "429"
    assert Record.of(Stream(0, error="refused"), "short", 0.0).error_key == "client_error"
    cut = Record.of(Stream(200, text_s=[0.1], end_s=0.2), "short", 0.0)  # no usage chunk
    assert not cut.ok and cut.error_key == "stream_error"


def test_scenario_ratios() -> None:
    a = fresh_under_decode([1.0, 1.2, 1.1], [1.5, 1.8, 1.7], decoders=4)
    assert a["ratio"] == pytest.approx(1.7 / 1.1) and not a["met"] and a["decoders"] == 4
    b = concurrent(side(1000, 5.0, [0.5]), side(1000, 20.0, [0.1]), clients=16)
    assert b["together"]["output_tok_s"] == 200.0 and b["ratio"] == pytest.approx(4.0)
    assert b["met"]


def test_poisson_arrivals_have_the_rate() -> None:
    times = poisson_arrivals(rate=4.0, count=4000, seed=7)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert len(times) == 4000 and all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.1)  # exponential: sd = mean
    assert poisson_arrivals(4.0, 4000, seed=7) == times  # seeded
    capped = poisson_arrivals(4.0, 4000, seed=7, max_s=10.0)
    assert capped == [t for t in times if t <= 10.0]


def test_request_mix() -> None:
    docs = documents([1500, 3000], seed=1)
    assert [d.tokens for d in docs] == [1500, 3000]
    specs = request_mix(400, docs, Mix(), seed=3, tag="t")
    longs = [s for s in specs if s.kind == "long"]
    shorts = [s for s in specs if s.kind == "short"]
    assert 0.4 < len(longs) / len(specs) < 0.6
    for s in longs:
        doc = next(d for d in docs if d.salt == s.salt)
        assert s.prompt.startswith(doc.text) and 16 <= len(s.prompt) - len(doc.text) <= 64
    assert all(64 <= len(s.prompt) + 1 <= 300 for s in shorts)
    assert len({s.salt for s in shorts}) == len(shorts)  # fresh: nothing to hit
    assert all(16 <= s.max_tokens <= 64 for s in specs)
    assert specs[0].body()["cache_salt"] == specs[0].salt and "kv_mode" not in specs[0].body()


def test_serve_flags() -> None:
    parser = build_parser()
    args = parser.parse_args(["bench", "--serve", "--quick", "--rates", "0.5", "1"])
    config = serve_config_from_args(args)
    assert config == dataclasses.replace(ServeConfig.quick(), rates=[0.5, 1.0])
    with pytest.raises(ConfigError, match="--contexts"):
        serve_config_from_args(parser.parse_args(["bench", "--serve", "--contexts", "512"]))


def test_a_tiny_serving_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = ServeConfig(
        rates=(1.0,), requests_per_rate=4, max_arrival_s=20.0, documents=(600,),
        mix=Mix(short_tokens=(64, 96), max_tokens=(4, 8)), fresh_tokens=300, decoders=2,
        decode_max_tokens=16, clients=4, client_prompt_tokens=64, client_max_tokens=8, reps=1,
    )  # fmt: skip
    assert serve_main(config, tmp_path) == 0
    results = json.loads((tmp_path / "serve.json").read_text())
    assert set(results) == {"config", "calibration", "rates", "scenarios", "summary", "settings"}
    (row,) = results["rates"]
    assert row["offered_rps"] == 1.0 and row["sent"] == len(row["records"]) >= 1
    assert row["completed"] + row["rejected_429"] + row["failed"] == row["sent"]
    assert row["completed"] == row["sent"]  # one light rate: nothing refused
    ttft, e2e = row["ttft_s"], row["e2e_s"]
    assert 0 < ttft["p50"] <= ttft["p90"] <= ttft["p99"] <= e2e["p99"]
    assert row["throughput_rps"] > 0 and row["output_tok_s"] > 0 and row["peak_rss_mib"] > 0
    for r in row["records"]:
        assert r["status"] == 200 and 0 < r["ttft_s"] <= r["e2e_s"]
        assert 1 <= r["completion_tokens"] <= 8
        if r["kind"] == "long":
            assert r["cached_tokens"] > 0  # the stored document's chunks
    a, b = results["scenarios"]["fresh_under_decode"], results["scenarios"]["concurrent_16"]
    assert a["idle_ttft_median_s"] > 0 and a["ratio"] == pytest.approx(
        a["loaded_ttft_median_s"] / a["idle_ttft_median_s"]
    )
    assert b["clients"] == 4 and b["together"]["completion_tokens"] > 0
    assert b["ratio"] == pytest.approx(
        b["together"]["output_tok_s"] / b["one_by_one"]["output_tok_s"]
    )
    summary = results["summary"]
    assert summary["peak_compute_rss_mib"] >= row["peak_rss_mib"]
    assert summary["capacity_rps"] == pytest.approx(1 / summary["service_time_s"])
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT p50" in capsys.readouterr().out
