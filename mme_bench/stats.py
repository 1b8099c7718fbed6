"""Summary statistics of invocation records: latency percentiles, error classes, throughput.

Percentiles use linear interpolation between closest ranks (numpy's default, the same definition as
Excel's PERCENTILE.INC), so a hand calculation can check them. Latency statistics cover successful
invocations only (a timeout's "latency" is the timeout); failures are counted by class instead. Cold
starts are never dropped as outliers: every summary has an `all` row, and `warm` and `cold` rows beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from mme_bench.client import ERROR_CLASSES

LATENCY_FIELDS = ("min_ms", "mean_ms", "median_ms", "p90_ms", "p99_ms", "max_ms")


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q, method="linear"))


def latency_summary(values: Sequence[float]) -> dict[str, float | None]:
    """min, mean, median, p90, p99, max of `values` (milliseconds); all None when there are none."""
    if not len(values):
        return {k: None for k in LATENCY_FIELDS}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "min_ms": float(arr.min()),
        "mean_ms": float(arr.mean()),
        "median_ms": percentile(arr, 50),
        "p90_ms": percentile(arr, 90),
        "p99_ms": percentile(arr, 99),
        "max_ms": float(arr.max()),
    }


@dataclass(frozen=True)
class Record:
    """One measured invocation (the raw results hold one row per record, in this shape)."""

    benchmark: str
    session: str
    target: str
    level: str  # the configuration it belongs to (e.g. "mc=4,clients=8")
    seq: int
    model: str
    payload: int
    route: str
    t_s: float  # start, seconds since the session's gateway was ready
    latency_ms: float
    status: int | None
    code: str | None
    error_class: str
    cold: bool
    first_call: bool
    fallback: bool
    client_wait_ms: float = 0.0  # open loop: how long the arrival waited for a free client
    max_concurrency: int | None = None
    clients: int | None = None

    @property
    def ok(self) -> bool:
        return self.error_class == "ok"


def error_counts(records: Iterable[Record]) -> dict[str, int]:
    """Invocations per error class (ok excluded), every class present even at zero."""
    counts = {c: 0 for c in ERROR_CLASSES}
    for r in records:
        if not r.ok:
            counts[r.error_class] = counts.get(r.error_class, 0) + 1
    return counts


def summarize(records: Sequence[Record], elapsed_s: float | None = None) -> dict[str, Any]:
    """One summary row: counts, error classes, error rate, throughput and latency of successes.

    tps is successful invocations per second of wall time (`elapsed_s`, the segment's duration), the
    number cost per invocation is computed from.
    """
    ok = [r.latency_ms for r in records if r.ok]
    errors = error_counts(records)
    n = len(records)
    failed = n - len(ok)
    row: dict[str, Any] = {
        "invocations": n,
        "ok": len(ok),
        "errors": failed,
        "error_rate": failed / n if n else 0.0,
        "throttles": errors["throttle"] + errors["not_ready"],
        **{f"err_{c}": v for c, v in errors.items()},
        "tps": (len(ok) / elapsed_s) if elapsed_s and elapsed_s > 0 else None,
        **latency_summary(ok),
    }
    return row


def summarize_scopes(records: Sequence[Record], elapsed_s: float | None = None) -> list[dict[str, Any]]:
    """`all`, `warm` and `cold` rows for one configuration (tps only on `all`: it is the segment's)."""
    rows = []
    for scope, chosen in (("all", list(records)), ("warm", [r for r in records if not r.cold]),
                          ("cold", [r for r in records if r.cold])):
        row = summarize(chosen, elapsed_s if scope == "all" else None)
        rows.append({"scope": scope, **row})
    return rows


def cumulative_hit_ratio(rows: Sequence[dict[str, float]]) -> list[tuple[float, float | None]]:
    """(t, hits / (hits + misses) since the first poll) for the hit-ratio-over-time chart."""
    if not rows:
        return []
    h0, m0 = rows[0]["cache_hits"], rows[0]["cache_misses"]
    out = []
    for r in rows:
        hits, misses = r["cache_hits"] - h0, r["cache_misses"] - m0
        out.append((r["t_s"], hits / (hits + misses) if hits + misses else None))
    return out
