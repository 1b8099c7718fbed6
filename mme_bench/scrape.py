"""The gateway's own view of a run, read from its Prometheus `/metrics`: cache hits, cold-start timings,
evictions, LoadedModelCount.

Client-side latency says how slow a cold start felt; only the gateway can say where the time went
(download, Triton load, waiting). Snapshots are taken before and after each measured segment and diffed;
a poller records the gauges over time for the charts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

HITS = ("mme_model_cache_requests_total", {"result": "hit"})
MISSES = ("mme_model_cache_requests_total", {"result": "miss"})
LOADED = "mme_loaded_models"
EVICTIONS = "mme_model_evictions_total"
HISTOGRAMS = {
    "download": "mme_model_downloading_seconds",
    "load": "mme_model_loading_seconds",
    "wait": "mme_model_loading_wait_seconds",
    "unload": "mme_model_unloading_seconds",
}


@dataclass(frozen=True)
class Snapshot:
    """All samples of one scrape, keyed by (sample name, sorted labels)."""

    at: float  # time.monotonic() of the scrape
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.samples.get((name, tuple(sorted((labels or {}).items()))), 0.0)

    def total(self, name: str) -> float:
        """Sum over every label set of `name` (e.g. evictions of all tiers and reasons)."""
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for (n, labels), v in self.samples.items():
            if n == name:
                key = dict(labels).get(label, "")
                out[key] = out.get(key, 0.0) + v
        return out


def parse_metrics(text: str, at: float | None = None) -> Snapshot:
    """Prometheus text exposition into a Snapshot (prometheus_client's own parser)."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Snapshot(time.monotonic() if at is None else at, samples)


@dataclass(frozen=True)
class CacheDelta:
    """What happened in the gateway's cache between two snapshots."""

    hits: float
    misses: float
    evictions: float
    evictions_by_tier: dict[str, float]
    loads: float
    mean_s: dict[str, float | None]  # download, load, wait, unload: mean seconds over the segment
    loaded_models_end: float

    @property
    def hit_ratio(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None


def cache_delta(before: Snapshot, after: Snapshot) -> CacheDelta:
    means: dict[str, float | None] = {}
    for short, base in HISTOGRAMS.items():
        count = after.value(base + "_count") - before.value(base + "_count")
        total = after.value(base + "_sum") - before.value(base + "_sum")
        means[short] = total / count if count > 0 else None
    tiers_after = after.by_label(EVICTIONS, "tier")
    tiers_before = before.by_label(EVICTIONS, "tier")
    return CacheDelta(
        hits=after.value(*HITS) - before.value(*HITS),
        misses=after.value(*MISSES) - before.value(*MISSES),
        evictions=after.total(EVICTIONS) - before.total(EVICTIONS),
        evictions_by_tier={t: v - tiers_before.get(t, 0.0) for t, v in tiers_after.items()},
        loads=after.value(HISTOGRAMS["load"] + "_count") - before.value(HISTOGRAMS["load"] + "_count"),
        mean_s=means,
        loaded_models_end=after.value(LOADED),
    )


async def scrape(session: aiohttp.ClientSession, base_url: str, timeout_s: float = 5.0) -> Snapshot | None:
    """One scrape; None if the gateway did not answer (a missed poll is a gap in a chart, not a failure)."""
    try:
        async with session.get(base_url.rstrip("/") + "/metrics",
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            return parse_metrics(await resp.text())
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


@dataclass
class MetricsPoller:
    """Polls /metrics every `interval_s` while a segment runs; rows feed the over-time charts."""

    base_url: str
    interval_s: float
    t0: float  # monotonic zero of the session, so every segment shares one time axis
    rows: list[dict[str, float]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.create_task(self._loop(session), name="metrics-poller")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def record(self, snap: Snapshot) -> None:
        self.rows.append({
            "t_s": round(snap.at - self.t0, 3),
            "loaded_models": snap.value(LOADED),
            "cache_hits": snap.value(*HITS),
            "cache_misses": snap.value(*MISSES),
            "evictions": snap.total(EVICTIONS),
            "in_flight": snap.value("mme_requests_in_flight"),
            "memory_used_bytes": snap.value("mme_memory_used_bytes"),
        })

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            snap = await scrape(session, self.base_url)
            if snap is not None:
                self.record(snap)
            await asyncio.sleep(self.interval_s)
