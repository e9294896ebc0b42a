"""The Prometheus text format of shared.runtime.metrics."""

from __future__ import annotations

import pytest

from shared.runtime.metrics import Registry, escape_label_value, format_value


def test_counter_renders_help_type_and_labelled_samples() -> None:
    registry = Registry()
    requests = registry.counter("cake_requests_total", "Requests answered", ("mode", "status"))
    requests.inc(mode="cake", status="200")
    requests.inc(2, mode="cake", status="200")
    requests.inc(mode="compute", status="503")
    assert registry.render() == (
        "# HELP cake_requests_total Requests answered\n"
        "# TYPE cake_requests_total counter\n"
        'cake_requests_total{mode="cake",status="200"} 3\n'
        'cake_requests_total{mode="compute",status="503"} 1\n'
    )
    assert requests.value(mode="cake", status="200") == 3
    assert requests.value(mode="load", status="200") == 0


def test_unlabelled_metrics_render_zero_before_use() -> None:
    registry = Registry()
    registry.counter("a_total", "A")
    registry.gauge("b", "B")
    lines = registry.render().splitlines()
    assert "a_total 0" in lines
    assert "b 0" in lines
    assert "# TYPE b gauge" in lines


def test_label_values_and_help_are_escaped() -> None:
    registry = Registry()
    gauge = registry.gauge("g", "help with \\ and\nnewline", ("path",))
    gauge.set(1.5, path='a"b\\c\nd')
    text = registry.render()
    assert "# HELP g help with \\\\ and\\nnewline\n" in text
    assert 'g{path="a\\"b\\\\c\\nd"} 1.5\n' in text
    assert escape_label_value('"') == '\\"'


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    registry = Registry()
    hist = registry.histogram("lat_seconds", "Latency", ("kind",), buckets=(0.1, 1.0, 0.5))
    for value in (0.05, 0.1, 0.7, 3.0):
        hist.observe(value, kind="x")
    lines = [line for line in registry.render().splitlines() if not line.startswith("#")]
    assert lines == [
        'lat_seconds_bucket{kind="x",le="0.1"} 2',
        'lat_seconds_bucket{kind="x",le="0.5"} 2',
        'lat_seconds_bucket{kind="x",le="1.0"} 3',
        'lat_seconds_bucket{kind="x",le="+Inf"} 4',
        'lat_seconds_sum{kind="x"} 3.85',
        'lat_seconds_count{kind="x"} 4',
    ]
    assert "# TYPE lat_seconds histogram" in registry.render()


def test_values_are_formatted_like_prometheus() -> None:
    assert format_value(3.0) == "3"
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(float("nan")) == "NaN"


def test_registry_returns_the_same_metric_and_refuses_conflicts() -> None:
    registry = Registry()
    first = registry.counter("c_total", "C", ("x",))
    assert registry.counter("c_total", "C", ("x",)) is first
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("c_total", "C", ("x",))
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("c_total", "C", ("y",))


def test_misuse_is_refused() -> None:
    registry = Registry()
    counter = registry.counter("c_total", "C", ("x",))
    with pytest.raises(ValueError, match="labels"):
        counter.inc(y="1")
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-1, x="1")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.counter("bad name", "C")
    with pytest.raises(ValueError, match="le"):
        registry.histogram("h", "H", ("le",))


def test_set_total_mirrors_a_count_kept_elsewhere() -> None:
    registry = Registry()
    counter = registry.counter("bytes_total", "Bytes", ("node",))
    counter.set_total(10, node="n1")
    counter.set_total(25, node="n1")
    assert 'bytes_total{node="n1"} 25\n' in registry.render()
