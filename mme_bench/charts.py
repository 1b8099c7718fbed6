"""PNG charts with matplotlib's Agg backend (no display needed on a server or in CI).

Latency charts switch to a log scale when the data span more than 20x: a cold start (seconds) and a
warm invocation (milliseconds) differ by two or three orders of magnitude, and both must stay visible.
Cold starts are drawn as their own points on top of the distribution, never trimmed away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from mme_bench.runner import RunData, SessionLog  # noqa: E402
from mme_bench.stats import cumulative_hit_ratio  # noqa: E402

CHART_FILES = {
    "stability_latency": "stability_latency.png",
    "concurrency_latency": "concurrency_latency.png",
    "cost_vs_latency": "cost_vs_latency.png",
    "cache_hit_ratio": "cache_hit_ratio.png",
    "loaded_models": "loaded_models.png",
    "concurrency_tps": "concurrency_tps.png",
}


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _log_axis(axis: Any) -> None:
    """Log scale with plain tick labels (2, 5, 10, 100 rather than 2 x 10^0); every minor tick is labelled
    when the data span less than a decade or so, else only the 2s and 5s. Call after plotting."""
    lo, hi = axis.get_view_interval()
    narrow = hi / max(lo, 1e-12) < 20
    axis.set_major_formatter(_PLAIN)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if narrow or f"{v:e}"[0] in "25" else ""))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_distribution(sessions: Sequence[SessionLog], title: str, path: Path) -> Path:
    """Per configuration: a box (p1-p99 whiskers) over successful invocations, every invocation as a
    jittered dot, cold starts as red crosses. Dots matter: stability runs are bimodal (warm vs cold) and
    a box alone would hide that."""
    groups = [(f"{s.target.name}\n{seg.level}", seg) for s in sessions for seg in s.segments]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.5))
    data = [[r.latency_ms for r in seg.records if r.ok] for _, seg in groups]
    if not any(data):
        _empty(ax, "no successful invocations")
    else:
        rng = np.random.default_rng(0)
        ax.boxplot([d or [float("nan")] for d in data], whis=(1, 99), showfliers=False, widths=0.5)
        labelled = {"warm": False, "cold": False}
        for i, (_, seg) in enumerate(groups, 1):
            for kind, colour, marker in (("warm", "tab:blue", "."), ("cold", "tab:red", "x")):
                ys = [r.latency_ms for r in seg.records if r.ok and r.cold == (kind == "cold")]
                if len(ys) > 2000:  # keep the PNG light: a uniform sample of the dots, the box uses all
                    ys = list(rng.choice(ys, 2000, replace=False))
                if ys:
                    xs = i + rng.uniform(-0.18, 0.18, len(ys))
                    ax.scatter(xs, ys, s=8 if kind == "warm" else 30, marker=marker, color=colour,
                               alpha=0.35 if kind == "warm" else 0.9, zorder=3,
                               label=None if labelled[kind] else ("cold start" if kind == "cold" else "warm"))
                    labelled[kind] = True
        ax.set_xticks(range(1, len(groups) + 1), [g for g, _ in groups], fontsize=7)
        everything = [v for d in data for v in d]
        if max(everything) / max(min(everything), 1e-9) > 20:  # cold and warm together: needs a log scale
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
            ax.set_ylabel("latency (ms, log scale)")
        else:
            ax.set_ylabel("latency (ms)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title + " (box whiskers: p1-p99)")
    return _save(fig, path)


def cost_vs_latency(rows: Sequence[dict[str, Any]], target_p99_ms: float, path: Path) -> Path:
    """Each configuration's cost per million invocations against its p99 latency, numbered, with a legend
    naming each number (labels beside the points collide when configurations perform alike)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    p99_key = next((k for k in (rows[0] if rows else {}) if k.startswith("p99_ms")), "p99_ms")
    pts = [r for r in rows if r.get("cost_per_million_usd") is not None and r.get(p99_key) is not None]
    if not pts:
        _empty(ax, "no priced configuration with a measured throughput")
    else:
        for i, r in enumerate(sorted(pts, key=lambda r: (r[p99_key], r["cost_per_million_usd"])), 1):
            colour = "tab:green" if r.get("meets_target") else "tab:gray"
            load = f"mc={r['max_concurrency']} clients={r['clients']}" if r.get("max_concurrency") is not None \
                else f"{r.get('benchmark', '')}, clients={r.get('clients')}"
            x, y = r[p99_key], r["cost_per_million_usd"]
            ax.scatter(x, y, color=colour, s=40, zorder=3,
                       label=f"{i}: {r['target']} {load} (${y:.3g}/M, p99 {x:.3g} ms)" if x < 1000 else
                       f"{i}: {r['target']} {load} (${y:.3g}/M, p99 {x:,.0f} ms)")
            ax.annotate(str(i), (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.axvline(target_p99_ms, color="tab:red", linestyle="--", label=f"p99 target {target_p99_ms:g} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_axis(ax.xaxis)
        _log_axis(ax.yaxis)
        ax.set_xlabel("p99 latency (ms, log scale)")
        ax.set_ylabel("USD per million invocations (log scale)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Cost against latency (green: meets the target)")
    return _save(fig, path)


def over_time(sessions: Sequence[SessionLog], what: str, path: Path) -> Path:
    """LoadedModelCount or the cumulative cache hit ratio over each session's time."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for s in sessions:
        if not s.timeline:
            continue
        if what == "hit_ratio":
            pts = [(t, v) for t, v in cumulative_hit_ratio(s.timeline) if v is not None]
        else:
            pts = [(r["t_s"], r["loaded_models"]) for r in s.timeline]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=s.name, linewidth=1.2,
                    drawstyle="steps-post" if what != "hit_ratio" else "default")
            drawn = True
    if not drawn:
        _empty(ax, "no /metrics samples")
    else:
        ax.set_xlabel("seconds since the gateway was ready")
        if what == "hit_ratio":
            ax.set_ylabel("cache hit ratio (cumulative)")
            ax.set_ylim(0, 1.05)
        else:
            ax.set_ylabel("LoadedModelCount")
        ax.legend(fontsize=7, loc="best")
    ax.set_title("Model cache hit ratio over time" if what == "hit_ratio" else "Loaded models over time")
    return _save(fig, path)


def concurrency_tps(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Transactions per second and throttles against clients, one line per target and max-concurrency."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    alls = [r for r in rows if r["scope"] == "all" and r.get("tps") is not None]
    if not alls:
        _empty(ax, "no concurrency benchmark")
    else:
        keys = dict.fromkeys((r["target"], r["max_concurrency"]) for r in alls)
        for target, mc in keys:
            pts = sorted((r["clients"], r["tps"], r["throttles"]) for r in alls
                         if r["target"] == target and r["max_concurrency"] == mc)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{target} mc={mc}")
            for c, tps, thr in pts:
                if thr:
                    ax.annotate(f"{thr} throttled", (c, tps), fontsize=7, xytext=(3, -10), textcoords="offset points")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("successful invocations per second")
        ax.legend(fontsize=8)
    ax.set_title("Throughput by client count")
    return _save(fig, path)


def draw_all(data: RunData, analysis: Any, charts_dir: Path) -> dict[str, Path]:
    """Every chart of the report, written into `charts_dir`; returns name -> path."""
    charts_dir.mkdir(parents=True, exist_ok=True)
    out = {
        "stability_latency": latency_distribution(data.sessions_of("stability"), "Stability: latency per target",
                                                  charts_dir / CHART_FILES["stability_latency"]),
        "concurrency_latency": latency_distribution(data.sessions_of("concurrency"),
                                                    "Concurrency: latency per configuration",
                                                    charts_dir / CHART_FILES["concurrency_latency"]),
        "cost_vs_latency": cost_vs_latency(analysis.cost, data.config.cost.target_p99_ms,
                                           charts_dir / CHART_FILES["cost_vs_latency"]),
        "cache_hit_ratio": over_time([s for s in data.sessions if s.benchmark != "perf_analyzer"], "hit_ratio",
                                     charts_dir / CHART_FILES["cache_hit_ratio"]),
        "loaded_models": over_time([s for s in data.sessions if s.benchmark != "perf_analyzer"], "loaded",
                                   charts_dir / CHART_FILES["loaded_models"]),
        "concurrency_tps": concurrency_tps(analysis.concurrency, charts_dir / CHART_FILES["concurrency_tps"]),
    }
    return out
