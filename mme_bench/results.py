"""The results directory, laid out like the serverless benchmarking toolkit's (raw / summary / report):

    <out>/
      config.json                       the config as run (after defaults)
      run.json                          when, how long, notes (fallbacks, skipped passes)
      raw/stability_invocations.csv     one row per invocation (also cache_, concurrency_)
      raw/metrics_timeseries.csv        /metrics polls: LoadedModelCount, hits, misses, evictions
      raw/models.csv                    the model set (key, bytes)
      raw/perf_analyzer/                perf_analyzer's own CSV and log, when the pass ran
      summary/*.csv, summary/recommendation.json
      charts/*.png
      report/benchmark_report.html      everything above in one page, charts embedded

Every table is written even when empty (header only), so scripts reading the directory can rely on it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from mme_bench.analysis import Analysis
from mme_bench.runner import RunData
from mme_bench.stats import LATENCY_FIELDS, Record

RECORD_COLUMNS = tuple(f.name for f in dataclasses.fields(Record))
TIMESERIES_COLUMNS = ("session", "benchmark", "target", "t_s", "loaded_models", "cache_hits", "cache_misses",
                      "evictions", "in_flight", "memory_used_bytes")
_SUMMARY = ("invocations", "ok", "errors", "error_rate", "throttles", "err_throttle", "err_not_ready", "err_4xx",
            "err_5xx", "err_timeout", "err_connection", "tps", *LATENCY_FIELDS)
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "stability_summary": ("target", "instance_type", "memory_budget_bytes", "level", "max_concurrency", "clients",
                          "scope", *_SUMMARY, "cost_per_million_usd"),
    "concurrency_summary": ("target", "instance_type", "memory_budget_bytes", "level", "max_concurrency",
                            "clients", "scope", *_SUMMARY, "cost_per_million_usd"),
    "cache_summary": ("benchmark", "target", "instance_type", "memory_budget_bytes", "level", "invocations",
                      "cache_hits", "cache_misses", "hit_ratio", "evictions", "evictions_disk", "evictions_memory",
                      "loads", "download_mean_ms", "load_mean_ms", "loading_wait_mean_ms", "cold_invocations",
                      "cold_latency_mean_ms", "first_inference_mean_ms", "warm_latency_mean_ms",
                      "loaded_models_end", "loaded_models_max"),
    "cost_analysis": ("target", "instance_type", "price_per_hour", "benchmark", "level", "max_concurrency",
                      "clients", "tps", "p99_ms_all", "error_rate", "cost_per_million_usd", "meets_target"),
    "mme_vs_single": ("models", "single_profile", "single_price_per_hour", "single_instances", "single_endpoints",
                      "single_monthly_usd", "mme_profile", "mme_price_per_hour", "mme_instances", "mme_endpoints",
                      "mme_monthly_usd", "saving_usd", "saving_pct", "break_even_models", "hours_per_month"),
    "seed_check": ("models", "single_profile", "single_price_per_hour", "single_instances", "single_endpoints",
                   "single_monthly_usd", "mme_profile", "mme_price_per_hour", "mme_instances", "mme_endpoints",
                   "mme_monthly_usd", "saving_usd", "saving_pct"),
    "perf_analyzer_summary": ("target", "model", "status", "note", "concurrency", "inferences_per_s",
                              "p50_latency_ms", "p90_latency_ms", "p95_latency_ms", "p99_latency_ms"),
}
BENCHMARKS = ("stability", "cache", "concurrency")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = ()) -> Path:
    """Rows as CSV; the columns are `columns` followed by any other key the rows have, in first-seen order."""
    cols = list(columns)
    for row in rows:
        cols += [k for k in row if k not in cols]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="raise")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def write_results(data: RunData, analysis: Analysis, out: Path) -> dict[str, Path]:
    """Raw results and summaries (not charts or the report); returns name -> path."""
    files: dict[str, Path] = {}
    raw, summary = out / "raw", out / "summary"
    for bench in BENCHMARKS:
        records = [dataclasses.asdict(r) for s in data.sessions_of(bench) for seg in s.segments for r in seg.records]
        files[f"{bench}_invocations"] = write_csv(raw / f"{bench}_invocations.csv", records, RECORD_COLUMNS)
    series = [{"session": s.name, "benchmark": s.benchmark, "target": s.target.name, **row}
              for s in data.sessions for row in s.timeline]
    files["metrics_timeseries"] = write_csv(raw / "metrics_timeseries.csv", series, TIMESERIES_COLUMNS)
    files["models"] = write_csv(raw / "models.csv", [dataclasses.asdict(m) for m in data.models],
                                ("key", "size_bytes", "requested_bytes"))
    tables = {
        "stability_summary": analysis.stability, "concurrency_summary": analysis.concurrency,
        "cache_summary": analysis.cache, "cost_analysis": analysis.cost, "mme_vs_single": analysis.mme_vs_single,
        "seed_check": analysis.seed_check.get("rows", []), "perf_analyzer_summary": analysis.perf,
    }
    for name, rows in tables.items():
        files[name] = write_csv(summary / f"{name}.csv", rows, DEFAULT_COLUMNS[name])
    files["recommendation"] = _write_json(summary / "recommendation.json", analysis.recommendation)
    files["config"] = _write_json(out / "config.json", data.config.to_dict())
    files["run"] = _write_json(out / "run.json", {
        "name": data.config.name, "started_at": data.started_at, "wall_s": round(data.wall_s, 1),
        "models": len(data.models), "sessions": [s.name for s in data.sessions],
        "gateway_logs": {s.name: str(s.log_path) for s in data.sessions if s.log_path},
        "notes": analysis.notes, "seed_check_notes": analysis.seed_check.get("notes", []),
    })
    return files


def _write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path
