"""From measured sessions to the results directory, without a gateway: tables, costs, charts, HTML."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from mme_bench.analysis import analyse
from mme_bench.charts import draw_all
from mme_bench.config import config_from_dict
from mme_bench.loadgen import Segment
from mme_bench.models import ModelInfo
from mme_bench.report import write_report
from mme_bench.results import write_results
from mme_bench.runner import RunData, SessionLog
from mme_bench.scrape import parse_metrics
from mme_bench.stats import Record
from gateway.metrics import Metrics

CONFIG = {
    "targets": [{"name": "small", "url": "http://h:1", "instance_type": "ml.c5.large"},
                {"name": "big", "url": "http://h:2", "instance_type": "ml.r5.2xlarge"}],
    "models": {"source": "keys", "keys": ["a.tar.gz", "b.tar.gz"]},
    "payloads": {"examples": [{"Body": "1,2,3,4,5,6", "ContentType": "text/csv"}]},
    "concurrency": {"targets": ["big"], "max_concurrency": [2], "client_multipliers": [1, 2]},
    "cost": {"target_p99_ms": 100},
}


def rec(bench: str, target: str, level: str, i: int, latency: float, cold: bool = False, err: str = "ok",
        mc: int | None = None, clients: int = 1) -> Record:
    return Record(bench, f"{bench}-{target}", target, level, i, "a.tar.gz", 0, "sagemaker", i * 0.1, latency,
                  200 if err == "ok" else 429, None, err, cold, cold, False, 0.0, mc, clients)


def snap(hits: int, misses: int, loaded: int, at: float):  # type: ignore[no-untyped-def]
    m = Metrics()
    m.cache_requests.labels(result="hit").inc(hits)
    m.cache_requests.labels(result="miss").inc(misses)
    for _ in range(misses):
        m.loading.observe(2.0)
        m.loading_wait.observe(2.2)
        m.downloading.observe(0.01)
    m.loaded_models.set(loaded)
    return parse_metrics(m.render().decode(), at=at)


@pytest.fixture
def run_data() -> RunData:
    cfg = config_from_dict(CONFIG)
    small, big = cfg.targets
    # stability on `small`: 2 cold starts of 2.3 s, 8 warm calls of 10 ms -> p99 far above the 100 ms target
    stab_small = [rec("stability", "small", "sequential", i, 2300.0 if i < 2 else 10.0, cold=i < 2)
                  for i in range(10)]
    stab_big = [rec("stability", "big", "sequential", i, 2000.0 if i == 0 else 8.0, cold=i == 0)
                for i in range(10)]
    # concurrency on `big`: 2 clients at 200 tps, 4 clients at 250 tps with 2 throttles
    c2 = [rec("concurrency", "big", "mc=2 clients=2 closed", i, 9.0 + i % 3, mc=2, clients=2) for i in range(400)]
    c4 = [rec("concurrency", "big", "mc=2 clients=4 closed", i, 15.0 + i % 5, mc=2, clients=4) for i in range(498)]
    c4 += [rec("concurrency", "big", "mc=2 clients=4 closed", 999, 1.0, err="throttle", mc=2, clients=4)] * 2
    timeline = [{"t_s": float(t), "loaded_models": float(min(t, 2)), "cache_hits": float(t * 3),
                 "cache_misses": float(min(t, 2)), "evictions": 0.0, "in_flight": 0.0, "memory_used_bytes": 0.0}
                for t in range(5)]

    def session(bench: str, target, segments, mc=None):  # type: ignore[no-untyped-def]
        return SessionLog(bench, target, f"{bench}-{target.name}", "http://h", mc, segments, timeline, None)

    return RunData(cfg, [ModelInfo("a.tar.gz", 320), ModelInfo("b.tar.gz", 330)], sessions=[
        session("stability", small, [Segment("sequential", stab_small, 4.62, snap(0, 0, 0, 0), snap(8, 2, 2, 5),
                                             None, 1, exact_cold=True)]),
        session("stability", big, [Segment("sequential", stab_big, 2.072, snap(0, 0, 0, 0), snap(9, 1, 1, 5),
                                           None, 1, exact_cold=True)]),
        session("concurrency", big, [
            Segment("mc=2 clients=2 closed", c2, 2.0, snap(2, 2, 2, 0), snap(402, 2, 2, 2), 2, 2),
            Segment("mc=2 clients=4 closed", c4, 2.0, snap(402, 2, 2, 2), snap(900, 2, 2, 4), 2, 4),
        ], mc=2),
    ], started_at="2026-01-01T00:00:00+00:00", wall_s=12.0, notes=["a note"])


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_analysis_costs_and_recommendation(run_data: RunData) -> None:
    a = analyse(run_data)
    stab = {(r["target"], r["scope"]): r for r in a.stability}
    assert stab[("small", "cold")]["invocations"] == 2 and stab[("small", "warm")]["invocations"] == 8
    assert stab[("small", "all")]["max_ms"] == 2300.0
    conc = {r["clients"]: r for r in a.concurrency if r["scope"] == "all"}
    assert conc[2]["tps"] == 200.0 and conc[4]["tps"] == 249.0 and conc[4]["throttles"] == 2
    # $0.706/h at 249 tps: 0.706 / (249 x 3600) x 1e6 = $0.7876 per million
    assert conc[4]["cost_per_million_usd"] == pytest.approx(0.706 / (249 * 3600) * 1e6, abs=1e-4)
    # candidates: big's concurrency levels (measured) and small's stability run (p99 2.3 s misses the target)
    assert {(r["target"], r["benchmark"]) for r in a.cost} == {("big", "concurrency"), ("small", "stability")}
    rec = a.recommendation
    assert (rec["target"], rec["max_concurrency"], rec["clients"]) == ("big", 2, 4)  # cheaper per million
    assert "meets the 100 ms target" in rec["reason"]
    cache = {(r["benchmark"], r["target"], r["level"]): r for r in a.cache}
    small_cache = cache[("stability", "small", "sequential")]
    assert (small_cache["cache_hits"], small_cache["cache_misses"], small_cache["hit_ratio"]) == (8, 2, 0.8)
    assert small_cache["load_mean_ms"] == 2000.0 and small_cache["loading_wait_mean_ms"] == 2200.0
    assert small_cache["first_inference_mean_ms"] == 100.0  # 2300 ms cold mean - 2200 ms loading wait
    assert cache[("concurrency", "big", "mc=2 clients=4 closed")]["first_inference_mean_ms"] is None  # not exact
    mme = {(r["mme_profile"], r["models"]): r for r in a.mme_vs_single}
    assert mme[("ml.r5.2xlarge", 1000)]["single_monthly_usd"] == 171_360.0
    assert mme[("ml.r5.2xlarge", 1000)]["mme_monthly_usd"] == 1_016.64
    assert mme[("ml.r5.2xlarge", 2)]["break_even_models"] == 6


def test_every_file_of_the_results_directory(run_data: RunData, tmp_path: Path) -> None:
    a = analyse(run_data)
    files = write_results(run_data, a, tmp_path)
    charts = draw_all(run_data, a, tmp_path / "charts")
    report = write_report(run_data, a, charts, tmp_path)

    raw = read(tmp_path / "raw" / "stability_invocations.csv")
    assert len(raw) == 20 and {"latency_ms", "cold", "error_class", "route", "model"} <= set(raw[0])
    assert read(tmp_path / "raw" / "cache_invocations.csv") == []  # header only: no cache benchmark ran
    assert (tmp_path / "raw" / "cache_invocations.csv").read_text().startswith("benchmark,session,target")
    assert len(read(tmp_path / "raw" / "concurrency_invocations.csv")) == 900
    assert len(read(tmp_path / "raw" / "metrics_timeseries.csv")) == 15
    summary = read(tmp_path / "summary" / "concurrency_summary.csv")
    assert {"throttles", "tps", "p99_ms", "cost_per_million_usd", "clients", "max_concurrency"} <= set(summary[0])
    assert [r["scope"] for r in summary] == ["all", "warm", "cold"] * 2
    assert len(read(tmp_path / "summary" / "seed_check.csv")) == 2
    assert "recommendation" in files and files["run"].exists()
    for name, path in charts.items():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = report.read_text()
    assert page.count("data:image/png;base64,") == len(charts) == 6
    assert "171,360" in page and "1,016.64" in page and "a note" in page
    assert "<h2>Recommendation</h2>" in page and "ml.r5.2xlarge" in page
