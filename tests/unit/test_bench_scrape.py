"""Reading the gateway's /metrics: the text comes from the gateway's own metric registry."""

from __future__ import annotations

import pytest

from mme_bench.scrape import MetricsPoller, cache_delta, parse_metrics
from gateway.metrics import Metrics


def test_cache_delta_between_two_scrapes() -> None:
    m = Metrics()
    m.cache_requests.labels(result="hit").inc(3)
    m.cache_requests.labels(result="miss").inc(1)
    m.downloading.observe(0.2)
    m.loading.observe(2.0)
    m.loading_wait.observe(2.5)
    m.loaded_models.set(1)
    before = parse_metrics(m.render().decode(), at=10.0)

    m.cache_requests.labels(result="hit").inc(6)
    m.cache_requests.labels(result="miss").inc(2)
    for d, load, wait in ((0.1, 1.0, 1.5), (0.3, 3.0, 3.5)):
        m.downloading.observe(d)
        m.loading.observe(load)
        m.loading_wait.observe(wait)
    m.evictions.labels(tier="memory", reason="lru").inc(2)
    m.evictions.labels(tier="disk", reason="budget").inc(1)
    m.loaded_models.set(3)
    after = parse_metrics(m.render().decode(), at=12.0)

    d = cache_delta(before, after)
    assert (d.hits, d.misses, d.loads, d.evictions) == (6, 2, 2, 3)
    assert d.hit_ratio == pytest.approx(0.75)
    assert d.evictions_by_tier == {"memory": 2, "disk": 1}
    assert d.mean_s["download"] == pytest.approx(0.2)  # (0.1 + 0.3) / 2, the earlier 0.2 excluded
    assert d.mean_s["load"] == pytest.approx(2.0)
    assert d.mean_s["wait"] == pytest.approx(2.5)
    assert d.mean_s["unload"] is None
    assert d.loaded_models_end == 3


def test_poller_rows_share_the_session_time_axis() -> None:
    m = Metrics()
    m.loaded_models.set(2)
    m.cache_requests.labels(result="miss").inc(2)
    poller = MetricsPoller("http://unused", 0.5, t0=100.0)
    poller.record(parse_metrics(m.render().decode(), at=101.25))
    assert poller.rows == [{"t_s": 1.25, "loaded_models": 2.0, "cache_hits": 0.0, "cache_misses": 2.0,
                            "evictions": 0.0, "in_flight": 0.0, "memory_used_bytes": 0.0}]
