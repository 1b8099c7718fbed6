"""From measured sessions to the report's tables: summaries per configuration, the cache's account,
costs and the recommendation. Pure functions of RunData, so the report can be rebuilt and tested
without a gateway."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mme_bench import cost
from mme_bench.config import BenchConfig
from mme_bench.runner import RunData, SessionLog
from mme_bench.scrape import LOADED, cache_delta
from mme_bench.stats import summarize_scopes
from gateway.profiles import DEFAULT_PROFILES, InstanceProfile, load_profiles


@dataclass
class Analysis:
    stability: list[dict[str, Any]] = field(default_factory=list)
    concurrency: list[dict[str, Any]] = field(default_factory=list)
    cache: list[dict[str, Any]] = field(default_factory=list)
    cost: list[dict[str, Any]] = field(default_factory=list)
    mme_vs_single: list[dict[str, Any]] = field(default_factory=list)
    seed_check: dict[str, Any] = field(default_factory=dict)
    perf: list[dict[str, Any]] = field(default_factory=list)
    recommendation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _profiles(cfg: BenchConfig) -> dict[str, InstanceProfile]:
    return load_profiles(Path(cfg.cost.profiles_file) if cfg.cost.profiles_file else DEFAULT_PROFILES)


def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _config_cols(s: SessionLog) -> dict[str, Any]:
    return {"target": s.target.name, "instance_type": s.target.instance_type,
            "memory_budget_bytes": s.target.memory_budget_bytes}


def _summary_rows(s: SessionLog, price: float | None) -> list[dict[str, Any]]:
    rows = []
    for seg in s.segments:
        for row in summarize_scopes(seg.records, seg.elapsed_s):
            out = {**_config_cols(s), "level": seg.level,
                   "max_concurrency": seg.max_concurrency, "clients": seg.clients, **row}
            if row["scope"] == "all":
                out["cost_per_million_usd"] = cost.cost_per_million(price, row["tps"]) if price else None
            rows.append({k: _r(v, 4) if isinstance(v, float) else v for k, v in out.items()})
    return rows


def _cache_rows(s: SessionLog) -> list[dict[str, Any]]:
    rows = []
    for seg in s.segments:
        if seg.before is None or seg.after is None:
            continue
        d = cache_delta(seg.before, seg.after)
        ok = [r for r in seg.records if r.ok]
        cold = [r.latency_ms for r in ok if r.cold]
        warm = [r.latency_ms for r in ok if not r.cold]
        wait_ms = d.mean_s["wait"] * 1000 if d.mean_s["wait"] is not None else None
        cold_mean = sum(cold) / len(cold) if cold else None
        first_t = min((r.t_s for r in seg.records), default=0.0)
        last_t = max((r.t_s + r.latency_ms / 1000 for r in seg.records), default=0.0)
        loaded = [p["loaded_models"] for p in s.timeline if first_t - 1 <= p["t_s"] <= last_t + 1]
        loaded += [seg.before.value(LOADED), seg.after.value(LOADED)]
        rows.append({
            "benchmark": s.benchmark, **_config_cols(s), "level": seg.level,
            "invocations": len(seg.records), "cache_hits": round(d.hits), "cache_misses": round(d.misses),
            "hit_ratio": _r(d.hit_ratio, 4), "evictions": round(d.evictions),
            **{f"evictions_{tier}": round(v) for tier, v in
               sorted({"memory": 0.0, "disk": 0.0, **d.evictions_by_tier}.items())},
            "loads": round(d.loads),
            "download_mean_ms": _r(d.mean_s["download"] * 1000 if d.mean_s["download"] is not None else None),
            "load_mean_ms": _r(d.mean_s["load"] * 1000 if d.mean_s["load"] is not None else None),
            "loading_wait_mean_ms": _r(wait_ms),
            "cold_invocations": len(cold),
            "cold_latency_mean_ms": _r(cold_mean),
            # Only where each call's cold flag is exact (sequential): under concurrency the flags are first
            # calls per model, and subtracting the gateway's wait from their mean would mix two populations.
            "first_inference_mean_ms": _r(max(0.0, cold_mean - wait_ms) if seg.exact_cold and cold_mean is not None
                                          and wait_ms is not None else None),
            "warm_latency_mean_ms": _r(sum(warm) / len(warm) if warm else None),
            "loaded_models_end": round(d.loaded_models_end),
            "loaded_models_max": round(max(loaded)),
        })
    return rows


def analyse(data: RunData) -> Analysis:
    cfg = data.config
    profiles = _profiles(cfg)
    a = Analysis(notes=list(data.notes))

    def price_of(s: SessionLog) -> float | None:
        p = profiles.get(s.target.instance_type or "")
        return p.price_per_hour if p else None

    for t in cfg.targets:
        if t.instance_type and t.instance_type not in profiles:
            a.notes.append(f"target {t.name}: instance_type {t.instance_type!r} is not in the profiles file; "
                           "no cost for it")
    for s in data.sessions_of("stability"):
        a.stability += _summary_rows(s, price_of(s))
    for s in data.sessions_of("concurrency"):
        a.concurrency += _summary_rows(s, price_of(s))
    for s in data.sessions:
        if s.benchmark != "perf_analyzer":
            a.cache += _cache_rows(s)

    # Cost per configuration and the recommendation. A target's candidates are its concurrency levels when
    # those were measured (warm, sized runs), else its stability run (one client, cold starts included).
    scope = cfg.cost.latency_scope
    candidates = []
    for t in cfg.targets:
        measured = [r for r in a.concurrency if r["target"] == t.name]
        bench, rows = ("concurrency", measured) if measured else \
            ("stability", [r for r in a.stability if r["target"] == t.name])
        for r in (r for r in rows if r["scope"] == "all"):
            p99 = r["p99_ms"]
            if scope == "warm":
                warm = [w for w in rows if w["scope"] == "warm" and w["level"] == r["level"]]
                p99 = warm[0]["p99_ms"] if warm else p99
            prof = profiles.get(r["instance_type"] or "")
            c = cost.Candidate(r["target"], r["instance_type"], bench, r["max_concurrency"], r["clients"], p99,
                               r["error_rate"], r["tps"], r["cost_per_million_usd"])
            candidates.append(c)
            meets = p99 is not None and p99 <= cfg.cost.target_p99_ms and r["error_rate"] <= cfg.cost.max_error_rate
            a.cost.append({"target": c.target, "instance_type": c.profile,
                           "price_per_hour": prof.price_per_hour if prof else None, "benchmark": bench,
                           "level": r["level"], "max_concurrency": c.max_concurrency, "clients": c.clients,
                           "tps": c.tps, f"p99_ms_{scope}": p99, "error_rate": c.error_rate,
                           "cost_per_million_usd": _r(c.cost_per_million, 4), "meets_target": meets})
    rec = cost.recommend(candidates, cfg.cost.target_p99_ms, cfg.cost.max_error_rate)
    a.recommendation = {
        "target_p99_ms": cfg.cost.target_p99_ms, "max_error_rate": cfg.cost.max_error_rate,
        "latency_scope": scope, "reason": rec.reason,
        **({"target": rec.chosen.target, "instance_type": rec.chosen.profile,
            "max_concurrency": rec.chosen.max_concurrency, "clients": rec.chosen.clients,
            "p99_ms": rec.chosen.p99_ms, "tps": rec.chosen.tps, "error_rate": rec.chosen.error_rate,
            "cost_per_million_usd": rec.chosen.cost_per_million} if rec.chosen else {"target": None}),
    }

    # One MME endpoint against one endpoint per model, for every priced profile measured here.
    single = profiles.get(cfg.cost.single_model_instance_type)
    if single is None:
        a.notes.append(f"cost.single_model_instance_type {cfg.cost.single_model_instance_type!r} is not in the "
                       "profiles file; no MME comparison")
    else:
        counts = sorted({*cfg.cost.model_counts, len(data.models)})
        for name in dict.fromkeys(t.instance_type for t in cfg.targets if t.instance_type in profiles):
            mme = profiles[name]
            be = cost.break_even_models(single.price_per_hour, cfg.cost.single_model_instances, mme.price_per_hour,
                                        cfg.cost.mme_instances, cfg.cost.models_per_mme_endpoint,
                                        cfg.cost.hours_per_month)
            for n in counts:
                row = cost.compare(n, (single.name, single.price_per_hour), cfg.cost.single_model_instances,
                                   (mme.name, mme.price_per_hour), cfg.cost.mme_instances,
                                   cfg.cost.models_per_mme_endpoint, cfg.cost.hours_per_month).row()
                a.mme_vs_single.append({**row, "break_even_models": be,
                                        "hours_per_month": cfg.cost.hours_per_month})
    a.seed_check = cost.seed_check()  # always the seed's own 720-hour month: it checks the math, not the config

    for p in data.perf:
        base = {"target": p.target, "model": p.model, "status": p.status, "note": p.note}
        if p.rows:
            a.perf += [{**base, **row} for row in p.rows]
        else:
            a.perf.append(base)
    return a
