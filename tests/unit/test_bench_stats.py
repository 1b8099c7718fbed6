"""Benchmark statistics against values computed by hand."""

from __future__ import annotations

import pytest

from mme_bench.stats import Record, cumulative_hit_ratio, latency_summary, percentile, summarize, summarize_scopes


def rec(latency_ms: float, error_class: str = "ok", cold: bool = False, status: int | None = 200) -> Record:
    return Record(benchmark="stability", session="s", target="t", level="sequential", seq=0, model="m.tar.gz",
                  payload=0, route="v2", t_s=0.0, latency_ms=latency_ms, status=status, code=None,
                  error_class=error_class, cold=cold, first_call=cold, fallback=False)


def test_percentiles_interpolate_linearly_between_ranks() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    # rank = q/100 x (n-1): p50 -> rank 2 -> 30; p90 -> rank 3.6 -> 40 + 0.6 x 10 = 46; p99 -> 3.96 -> 49.6
    assert percentile(values, 50) == 30.0
    assert percentile(values, 90) == pytest.approx(46.0)
    assert percentile(values, 99) == pytest.approx(49.6)
    assert percentile(values, 0) == 10.0 and percentile(values, 100) == 50.0
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0


def test_latency_summary_of_one_to_hundred() -> None:
    s = latency_summary([float(v) for v in range(1, 101)])
    # 1..100: mean 50.5; median rank 49.5 -> 50.5; p90 rank 89.1 -> 90.1; p99 rank 98.01 -> 99.01
    assert s == pytest.approx({"min_ms": 1.0, "mean_ms": 50.5, "median_ms": 50.5, "p90_ms": 90.1,
                               "p99_ms": 99.01, "max_ms": 100.0})
    assert latency_summary([]) == {k: None for k in s}


def test_summary_counts_errors_by_class_and_excludes_them_from_latency() -> None:
    records = [rec(10), rec(20), rec(30), rec(5000, "timeout", status=None), rec(1, "throttle", status=429),
               rec(2, "not_ready", status=503), rec(3, "4xx", status=404), rec(4, "5xx", status=500)]
    row = summarize(records, elapsed_s=2.0)
    assert row["invocations"] == 8 and row["ok"] == 3 and row["errors"] == 5
    assert row["error_rate"] == pytest.approx(5 / 8)
    assert row["throttles"] == 2  # 429 and 503 ModelNotReady
    assert (row["err_throttle"], row["err_not_ready"], row["err_4xx"], row["err_5xx"], row["err_timeout"],
            row["err_connection"]) == (1, 1, 1, 1, 1, 0)
    assert row["tps"] == pytest.approx(1.5)  # 3 successes in 2 s
    assert (row["min_ms"], row["mean_ms"], row["max_ms"]) == (10.0, 20.0, 30.0)


def test_cold_starts_are_kept_in_all_and_shown_apart() -> None:
    records = [rec(2500, cold=True), rec(10), rec(12), rec(14), rec(1900, cold=True)]
    rows = {r["scope"]: r for r in summarize_scopes(records, elapsed_s=4.436)}
    assert rows["all"]["invocations"] == 5 and rows["all"]["max_ms"] == 2500.0  # not trimmed as an outlier
    assert rows["warm"]["invocations"] == 3 and rows["warm"]["mean_ms"] == pytest.approx(12.0)
    assert rows["cold"]["invocations"] == 2 and rows["cold"]["median_ms"] == pytest.approx(2200.0)
    assert rows["all"]["tps"] == pytest.approx(5 / 4.436)
    assert rows["warm"]["tps"] is None and rows["cold"]["tps"] is None


def test_cumulative_hit_ratio_counts_from_the_first_poll() -> None:
    rows = [{"t_s": 0.0, "cache_hits": 5, "cache_misses": 5}, {"t_s": 1.0, "cache_hits": 5, "cache_misses": 7},
            {"t_s": 2.0, "cache_hits": 11, "cache_misses": 7}]
    assert cumulative_hit_ratio(rows) == [(0.0, None), (1.0, 0.0), (2.0, 0.75)]
