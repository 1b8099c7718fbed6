"""The router's Prometheus metrics, on a private registry (one per router, so tests can run several).

Named like the gateway's (`mme_` prefix, `_total` counters, seconds). Per-instance series carry the
instance's host:port as `gateway`, not `instance`: Prometheus sets `instance` to the scraped target (here
the router itself), and a metric's own `instance` label would be renamed `exported_instance`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class RouterMetrics:
    def __init__(self, strategy: str) -> None:
        r = self.registry = CollectorRegistry()
        self.strategy = strategy
        Gauge("mme_router_routing_strategy", "the routing strategy among a model's holders (value 1)",
              ["strategy"], registry=r).labels(strategy).set(1)
        self.decisions = Counter(
            "mme_router_routing_decisions", "routing decisions by reason: affinity (an instance holding the "
            "model), hash (cold model to its rendezvous owner), spill (hot model to one more instance), failover "
            "(retry elsewhere after a refused connection), balance (no model, or affinity off)",
            ["reason", "strategy"], registry=r)
        self.outstanding = Gauge("mme_router_outstanding_requests", "requests in flight on each instance",
                                 ["gateway"], registry=r)
        self.healthy = Gauge("mme_router_instance_healthy", "1 when the instance takes traffic", ["gateway"],
                             registry=r)
        self.instance_models = Gauge("mme_router_instance_models", "models the router believes the instance holds",
                                     ["gateway"], registry=r)
        self.errors = Counter(
            "mme_router_errors", "requests the router could not complete, by kind: connect (refused, retried "
            "once elsewhere), upstream (connection lost after the request was sent), timeout, no_instance, client_gone "
            "(the client left, or stalled past --body-timeout, while its body was going upstream)",
            ["kind"], registry=r)
        self.requests = Counter("mme_router_requests", "requests by protocol and status", ["protocol", "status"],
                                registry=r)
        self.latency = Histogram("mme_router_request_duration_seconds", "time from request to answer, by protocol",
                                 ["protocol"], buckets=_LATENCY_BUCKETS, registry=r)

    def decision(self, reason: str) -> None:
        self.decisions.labels(reason, self.strategy).inc()

    def forget(self, instance: str) -> None:
        """An instance left the fleet: drop its series."""
        for gauge in (self.outstanding, self.healthy, self.instance_models):
            try:
                gauge.remove(instance)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
