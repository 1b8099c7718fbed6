"""The instances the router knows and what it knows of each: health, outstanding requests, models, memory.

Mutated only from the router's event loop (no locks): discovery adds and removes instances, the prober
sets health, listings and free memory, and the routing table counts requests and learns placements.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from gateway.router.discovery import Endpoint

log = logging.getLogger(__name__)


def _netloc(host: str, port: int) -> str:
    """host:port, with an IPv6 address (DNS may answer one) in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(eq=False)
class Instance:
    endpoint: Endpoint
    healthy: bool = False  # no traffic until a first health check passes
    failures: int = 0  # consecutive failed health checks
    outstanding: int = 0  # requests the router has in flight on it
    free_bytes: float | None = None  # memory budget less memory used, from its /metrics
    models: dict[str, float] = field(default_factory=dict)  # TargetModel -> monotonic time last placed or seen

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def http_base(self) -> str:
        return f"http://{_netloc(self.endpoint.host, self.endpoint.http_port)}"

    @property
    def grpc_target(self) -> str:
        return _netloc(self.endpoint.host, self.endpoint.grpc_port)

    def holds(self, model: str) -> bool:
        return model in self.models

    def place(self, model: str) -> None:
        """The router sent `model` here, or the instance said it has it: it holds the model from now on."""
        self.models[model] = time.monotonic()


Listener = Callable[[Instance], None]


class Fleet:
    """Instances by name, with callbacks for arrivals, departures and an instance coming back in."""

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
        self.on_added: list[Listener] = []
        self.on_removed: list[Listener] = []
        self.on_up: list[Listener] = []
        self.on_down: list[Listener] = []

    def update(self, endpoints: list[Endpoint]) -> None:
        """Make the fleet exactly `endpoints`: new ones start unhealthy, gone ones are dropped."""
        wanted = {e.name: e for e in endpoints}
        for name in [n for n, i in self.instances.items() if n not in wanted or i.endpoint != wanted[n]]:
            gone = self.instances.pop(name)
            log.info("router.instance_removed", extra={"instance": name})
            for listener in self.on_removed:
                listener(gone)
        for name, endpoint in wanted.items():
            if name not in self.instances:
                added = self.instances[name] = Instance(endpoint)
                log.info("router.instance_added", extra={"instance": name, "grpc_port": endpoint.grpc_port})
                for listener in self.on_added:
                    listener(added)

    def healthy(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.healthy]

    def mark_up(self, instance: Instance) -> None:
        """Back in: what it held before is unknown (it may have restarted), so the next listing says."""
        if instance.healthy:
            return
        instance.healthy, instance.failures = True, 0
        instance.models.clear()
        log.info("router.instance_up", extra={"instance": instance.name})
        for listener in self.on_up:
            listener(instance)

    def mark_down(self, instance: Instance, why: str) -> None:
        if not instance.healthy:
            return
        instance.healthy = False
        log.warning("router.instance_down", extra={"instance": instance.name, "reason": why})
        for listener in self.on_down:
            listener(instance)

    def unavailable_reason(self) -> str:
        """Why no instance can take a request, for the 503's message (addresses stay in the log, as the
        gateways keep theirs out of answers)."""
        if not self.instances:
            return "no gateway instance discovered yet"
        return f"no healthy gateway instance: {len(self.instances)} known, all failing health checks"
