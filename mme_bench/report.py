"""One self-contained HTML page: recommendation, summary tables, cost analysis and the charts embedded as
base64 PNGs, so the report can be mailed or attached to a ticket as a single file."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Sequence

from mme_bench.analysis import Analysis
from mme_bench.results import DEFAULT_COLUMNS
from mme_bench.runner import RunData

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222;max-width:1400px}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1em} th,td{border:1px solid #ddd;padding:3px 6px}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.rec{background:#eef7ee;border-left:4px solid #3a3;padding:.8em 1em} .warn{background:#fff6e5;
border-left:4px solid #e90;padding:.5em 1em} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.muted{color:#777;font-size:12px}
"""

# Columns shown in the page (the CSVs have all of them).
_LAT = ("min_ms", "mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms")
_SHOW = {
    "stability": ("target", "instance_type", "memory_budget_bytes", "scope", "invocations", "ok", "errors",
                  "throttles", *_LAT, "tps", "cost_per_million_usd"),
    "concurrency": ("target", "instance_type", "max_concurrency", "clients", "scope", "invocations", "ok",
                    "throttles", "err_not_ready", "err_4xx", "err_5xx", "err_timeout", "err_connection",
                    "error_rate", *_LAT, "tps", "cost_per_million_usd"),
    "cache": ("benchmark", "target", "level", "invocations", "cache_hits", "cache_misses", "hit_ratio", "evictions",
              "loads", "download_mean_ms", "load_mean_ms", "loading_wait_mean_ms", "cold_invocations",
              "cold_latency_mean_ms", "first_inference_mean_ms", "warm_latency_mean_ms", "loaded_models_max"),
}


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.2f}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return html.escape(str(v))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, empty: str = "nothing measured") -> str:
    """An HTML table of `rows` (only `columns`, when given); numbers right-aligned."""
    if not rows:
        return f'<p class="muted">{html.escape(empty)}</p>'
    cols = [c for c in (columns or list(rows[0])) if any(c in r for r in rows)]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cls = ' class="n"' if isinstance(v, (int, float)) and not isinstance(v, bool) else ""
            cells.append(f"<td{cls}>{_fmt(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    b64 = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render(data: RunData, a: Analysis, charts: dict[str, Path]) -> str:
    cfg = data.config
    rec = a.recommendation
    w = cfg.workload
    arrival = "closed loop" if w.arrival == "closed" else f"open loop, {w.arrival} arrivals at {w.rate_per_s:g}/s" \
        + (f" (gamma shape {w.gamma_shape:g})" if w.arrival == "gamma" else "")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}: mme-gateway benchmark"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(cfg.name)}: mme-gateway benchmark</h1>",
        f"<p class='muted'>Started {html.escape(data.started_at)}, measured for {data.wall_s:.0f} s. "
        f"{len(data.models)} models ({sum(m.size_bytes for m in data.models):,} bytes), Zipf alpha "
        f"{w.zipf_alpha:g}{' (uniform)' if w.zipf_alpha == 0 else ''}, {arrival}. Latency statistics are over "
        "successful invocations, percentiles by linear interpolation; failures are counted by class "
        "(throttle = HTTP 429, not_ready = 503 ModelNotReady, then 4xx / 5xx, client timeout, connection). "
        f"Costs use a {cfg.cost.hours_per_month:g}-hour month and the prices in the profiles file.</p>",
        "<h2>Recommendation</h2>",
        f"<div class='rec'><b>{html.escape(str(rec.get('instance_type') or rec.get('target') or 'none'))}"
        + (f", max-concurrency {rec.get('max_concurrency')}" if rec.get("max_concurrency") is not None else "")
        + f"</b><br>{html.escape(rec.get('reason', ''))}</div>",
    ]
    if a.notes:
        parts.append("<div class='warn'><b>Notes</b><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in a.notes)
                     + "</ul></div>")
    parts += [
        "<h2>Stability (invocations one after another)</h2>",
        "<p class='muted'>One fresh gateway per target. Cold starts (the gateway's cache-miss counter rose during "
        "the call) are the <code>cold</code> rows and the red crosses; they are kept, not trimmed as outliers.</p>",
        table(a.stability, _SHOW["stability"], "stability benchmark not run"),
        _img(charts["stability_latency"], "stability latency"),
        "<h2>Concurrency</h2>",
        "<p class='muted'>Per max-concurrency setting a fresh, warmed-up gateway; clients = ceil(max-concurrency x "
        "multiplier). Under concurrency a call is counted cold when it is the first to its model in the session "
        "(cold rows appear only when there were any; the CSV has warm and cold rows for every level); reloads "
        "after evictions show in the cache table.</p>",
        table([r for r in a.concurrency if r["scope"] == "all" or (r["scope"] == "cold" and r["invocations"])],
              _SHOW["concurrency"], "concurrency benchmark not run"),
        _img(charts["concurrency_latency"], "concurrency latency"),
        _img(charts["concurrency_tps"], "throughput by clients"),
        "<h2>Multi-model cache</h2>",
        "<p class='muted'>From the gateway's /metrics, diffed over each measured segment: ModelCacheHit "
        "(mme_model_cache_requests_total), ModelDownloadingTime, ModelLoadingTime, ModelLoadingWaitTime (means), "
        "evictions, LoadedModelCount. First inference = mean cold latency minus the mean loading wait (sequential "
        "runs only, where every call's cold flag is exact).</p>",
        table(a.cache, _SHOW["cache"], "no /metrics data"),
        _img(charts["cache_hit_ratio"], "cache hit ratio over time"),
        _img(charts["loaded_models"], "loaded models over time"),
        "<h2>Cost</h2>",
        "<p class='muted'>Cost per million invocations = price per hour / (invocations per second x 3600) x 10^6, "
        "for one instance at the measured throughput.</p>",
        table(a.cost, empty="no priced configuration"),
        _img(charts["cost_vs_latency"], "cost against latency"),
        f"<h3>One multi-model endpoint against one endpoint per model ({cfg.cost.hours_per_month:g} h/month)</h3>",
        table(a.mme_vs_single, DEFAULT_COLUMNS["mme_vs_single"], "no comparison (profiles missing)"),
        "<h3>Check of the math: the AWS multi-model endpoint blog post's cases from its own prices</h3>",
        table(a.seed_check.get("rows", [])),
        "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in a.seed_check.get("notes", [])) + "</ul>",
        "<h2>perf_analyzer</h2>",
        table(a.perf, DEFAULT_COLUMNS["perf_analyzer_summary"], "perf_analyzer pass not enabled"),
        "<h2>Configuration</h2>",
        table([{"target": t.name, "url": t.url or "(started by the bench)", "instance_type": t.instance_type,
                "memory_budget_bytes": t.memory_budget_bytes, "max_concurrency": t.max_concurrency,
                "extra_args": " ".join(t.extra_args)} for t in cfg.targets]),
        "<p class='muted'>Raw invocations, /metrics time series and every table are CSV files beside this report "
        "(../raw, ../summary).</p></body></html>",
    ]
    return "\n".join(parts)


def write_report(data: RunData, a: Analysis, charts: dict[str, Path], out: Path) -> Path:
    path = out / "report" / "benchmark_report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data, a, charts))
    return path
