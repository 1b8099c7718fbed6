"""`mme-gateway bench` end to end: a short run against a real gateway (started by the bench's own launcher
on a temporary local store, with its embedded Triton) writes every file of the report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gateway.demo import DEMO_CITIES, build_store
from tests.helpers import REPO_ROOT

CITIES = DEMO_CITIES[:2]


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, str]:
    work = tmp_path_factory.mktemp("bench")
    build_store(work / "store", CITIES)
    config = {
        "name": "e2e",
        "targets": [{"name": "c5", "instance_type": "ml.c5.large", "extra_args": ["--queue-timeout", "2"]}],
        "launcher": {"store": str(work / "store"), "startup_timeout_s": 60},
        "workload": {"zipf_alpha": 1.0, "seed": 1},
        "payloads": {"examples": [
            {"Body": "1994,3188,5,1.5,1.62,3", "ContentType": "text/csv"},
            {"Body": json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                             "data": [1990, 3047, 5, 1.0, 1.11, 2]}]}),
             "ContentType": "application/json"},
        ]},
        "request": {"timeout_s": 30},
        "stability": {"invocations": 4},
        "cache": {"clients": 1, "invocations": 3, "duration_s": None, "poll_interval_s": 0.25},
        "concurrency": {"max_concurrency": [2], "client_multipliers": [1], "duration_s": 1.5},
        "perf_analyzer": {"enabled": True, "concurrency_range": "1", "measurement_interval_ms": 200,
                          "max_trials": 3, "timeout_s": 40},
        "cost": {"target_p99_ms": 5000, "max_error_rate": 0.05},
    }
    cfg_path = work / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    out = work / "results"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", str(cfg_path), "--out", str(out),
                           "--no-progress"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, elapsed, proc.stdout + proc.stderr


def test_the_run_is_short_and_prints_the_report_path(bench_run: tuple[Path, float, str]) -> None:
    out, elapsed, output = bench_run
    assert str(out / "report" / "benchmark_report.html") in output
    assert elapsed < 60, f"the e2e benchmark took {elapsed:.0f}s"
    assert '"event": "bench.report"' in output  # structured logs


def test_raw_invocations_per_benchmark(bench_run: tuple[Path, float, str]) -> None:
    out = bench_run[0]
    stability = read(out / "raw" / "stability_invocations.csv")
    assert len(stability) == 4 and all(r["error_class"] == "ok" for r in stability)
    assert {r["model"] for r in stability} <= {f"{c}.tar.gz" for c in CITIES}
    assert stability[0]["cold"] == "True"  # the first call on a fresh gateway is a cache miss
    cold_models = [r["model"] for r in stability if r["cold"] == "True"]
    assert len(cold_models) == len(set(cold_models))  # everything fits: each model is cold once
    assert {r["route"] for r in stability} <= {"sagemaker", "v2"}
    cache = read(out / "raw" / "cache_invocations.csv")
    assert len(cache) == 3
    concurrency = read(out / "raw" / "concurrency_invocations.csv")
    assert len(concurrency) > 10 and {r["clients"] for r in concurrency} == {"2"}
    assert all(r["cold"] == "False" for r in concurrency)  # warmed up before measuring
    series = read(out / "raw" / "metrics_timeseries.csv")
    assert {"stability-c5", "cache-c5", "concurrency-c5-mc2"} <= {r["session"] for r in series}
    assert max(float(r["loaded_models"]) for r in series if r["session"] == "stability-c5") >= 1
    assert len(read(out / "raw" / "models.csv")) == len(CITIES)


def test_summaries(bench_run: tuple[Path, float, str]) -> None:
    out = bench_run[0]
    stability = {r["scope"]: r for r in read(out / "summary" / "stability_summary.csv")}
    assert set(stability) == {"all", "warm", "cold"}
    assert int(stability["all"]["invocations"]) == 4 and int(stability["all"]["errors"]) == 0
    assert int(stability["cold"]["invocations"]) >= 1
    assert float(stability["cold"]["min_ms"]) > float(stability["warm"]["max_ms"])  # a load is slower
    for col in ("min_ms", "mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms"):
        assert float(stability["all"][col]) > 0
    conc = [r for r in read(out / "summary" / "concurrency_summary.csv") if r["scope"] == "all"]
    assert len(conc) == 1 and conc[0]["max_concurrency"] == "2" and conc[0]["clients"] == "2"
    assert float(conc[0]["tps"]) > 0 and float(conc[0]["cost_per_million_usd"]) > 0
    assert {"throttles", "err_4xx", "err_5xx", "err_timeout"} <= set(conc[0])
    cache = {r["benchmark"]: r for r in read(out / "summary" / "cache_summary.csv")}
    assert int(cache["stability"]["cache_misses"]) >= 1 and int(cache["stability"]["loads"]) >= 1
    assert float(cache["stability"]["load_mean_ms"]) > 0
    assert float(cache["concurrency"]["hit_ratio"]) == 1.0
    costs = read(out / "summary" / "cost_analysis.csv")
    assert costs and costs[0]["instance_type"] == "ml.c5.large" and costs[0]["price_per_hour"] == "0.119"
    seed = {r["models"]: r for r in read(out / "summary" / "seed_check.csv")}
    assert float(seed["1000"]["single_monthly_usd"]) == 171_360.0
    assert float(seed["1000"]["mme_monthly_usd"]) == 1_016.64
    assert read(out / "summary" / "mme_vs_single.csv")
    rec = json.loads((out / "summary" / "recommendation.json").read_text())
    assert rec["instance_type"] == "ml.c5.large" and rec["max_concurrency"] == 2 and rec["reason"]
    perf = read(out / "summary" / "perf_analyzer_summary.csv")
    assert perf and perf[0]["status"] in ("ok", "skipped", "failed")
    if perf[0]["status"] == "ok":
        assert float(perf[0]["inferences_per_s"]) > 0 and float(perf[0]["p99_latency_ms"]) > 0
    else:
        assert perf[0]["note"]


def test_charts_and_html_report(bench_run: tuple[Path, float, str]) -> None:
    out = bench_run[0]
    charts = sorted(p.name for p in (out / "charts").glob("*.png"))
    assert charts == sorted(["cache_hit_ratio.png", "concurrency_latency.png", "concurrency_tps.png",
                             "cost_vs_latency.png", "loaded_models.png", "stability_latency.png"])
    for name in charts:
        assert (out / "charts" / name).read_bytes()[:4] == b"\x89PNG"
    page = (out / "report" / "benchmark_report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    for heading in ("Recommendation", "Stability", "Concurrency", "Multi-model cache", "Cost", "perf_analyzer"):
        assert f"<h2>{heading}" in page
    assert json.loads((out / "run.json").read_text())["sessions"] == [
        "stability-c5", "cache-c5", "concurrency-c5-mc2", "perf_analyzer-c5"]
    assert (out / "config.json").exists()
