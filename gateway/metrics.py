"""The one metric registry, in Prometheus form.

SageMaker's multi-model metrics keep their SageMaker name in the help text so users can map dashboards:
ModelCacheHit, ModelLoadingWaitTime, ModelDownloadingTime, ModelLoadingTime, ModelUnloadingTime,
LoadedModelCount.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """All gateway metrics on a private registry (one per gateway, so tests can run several)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.cache_requests = Counter(
            "mme_model_cache_requests", "ModelCacheHit: invocations whose model was already loaded (result=hit) "
            "or not (result=miss); hit / (hit + miss) is SageMaker's ModelCacheHit average", ["result"], registry=r,
        )
        self.loading_wait = Histogram(
            "mme_model_loading_wait_seconds", "ModelLoadingWaitTime: how long an invocation waited for its model "
            "to be downloaded and loaded", buckets=_LOAD_BUCKETS, registry=r,
        )
        self.downloading = Histogram(
            "mme_model_downloading_seconds", "ModelDownloadingTime: time to download an artifact from the store",
            buckets=_LOAD_BUCKETS, registry=r,
        )
        self.loading = Histogram(
            "mme_model_loading_seconds", "ModelLoadingTime: time for Triton to load a model",
            buckets=_LOAD_BUCKETS, registry=r,
        )
        self.unloading = Histogram(
            "mme_model_unloading_seconds", "ModelUnloadingTime: time for Triton to unload a model",
            buckets=_LOAD_BUCKETS, registry=r,
        )
        self.loaded_models = Gauge("mme_loaded_models", "LoadedModelCount: models loaded in Triton now", registry=r)
        self.downloads = Counter("mme_model_downloads", "artifacts downloaded from the store", registry=r)
        self.download_bytes = Counter("mme_model_download_bytes", "bytes downloaded from the store", registry=r)
        self.loads = Counter("mme_model_loads", "model loads requested from Triton, by result", ["result"], registry=r)
        self.load_failures = Counter(
            "mme_model_load_failures", "models that could not be served, by reason", ["reason"], registry=r
        )
        self.disk_hits = Counter(
            "mme_disk_tier_hits", "loads served from the NVMe tier without a download", registry=r
        )
        self.unhealthy_models = Counter(
            "mme_model_unhealthy", "models restarted because their process hung or died while serving, by reason "
            "(timeout, stub_died)", ["reason"], registry=r,
        )
        self.stale_served = Counter(
            "mme_store_unreachable_served_staged", "times the store could not be reached and the copy on disk was "
            "served instead (stale-if-error)", registry=r,
        )
        self.evictions = Counter(
            "mme_model_evictions", "models evicted, by tier (memory|disk) and reason (memory: "
            "memory_pressure, device_memory, measured_over_budget, growth, out_of_memory, cache_disabled, api, "
            "deleted, deleted_from_store)", ["tier", "reason"], registry=r,
        )
        self.memory_used = Gauge("mme_memory_used_bytes", "model memory in use (measured or estimated)", registry=r)
        self.memory_budget = Gauge("mme_memory_budget_bytes", "memory budget for loaded models", registry=r)
        self.device_memory_used = Gauge(
            "mme_device_memory_used_bytes", "memory in use on the device as the probe reads it, whoever holds it "
            "(NVML: the whole GPU; host probe: RAM less MemAvailable)", registry=r,
        )
        self.memory_refusals = Counter(
            "mme_memory_refusals", "loads refused for memory, by reason: model_too_large and device_full and "
            "out_of_memory answer 507, memory_busy answers 503 (retry)", ["reason"], registry=r,
        )
        self.loads_in_flight = Gauge("mme_model_loads_in_flight", "models being loaded into Triton now", registry=r)
        self.disk_used = Gauge("mme_disk_used_bytes", "bytes of staged model directories on the NVMe tier", registry=r)
        self.disk_budget = Gauge("mme_disk_budget_bytes", "byte budget of the NVMe tier", registry=r)
        self.in_flight = Gauge("mme_requests_in_flight", "inference requests being served now", registry=r)
        self.requests = Counter(
            "mme_requests", "inference requests by protocol and status code", ["protocol", "status"], registry=r
        )
        self.triton_restarts = Counter("mme_triton_restarts", "times the embedded Triton was restarted", registry=r)
        self.loop_lag = Histogram(
            "mme_event_loop_lag_seconds", "how late a timer on the gateway's event loop fired (sampled every "
            "20 ms): anything that holds the loop shows here, and every request waits that long",
            buckets=_LAG_BUCKETS, registry=r,
        )

        self._request_children: dict[tuple[str, int], Counter] = {}

    def count_request(self, protocol: str, status: int) -> None:
        """Count one inference request; label children are cached (labels() costs microseconds per call)."""
        child = self._request_children.get((protocol, status))
        if child is None:
            child = self._request_children[(protocol, status)] = self.requests.labels(
                protocol=protocol, status=str(status)
            )
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
