"""The routing table: applies the policy to the fleet, holds the outstanding count, learns placements and
retries a refused connection once elsewhere. Both forwarders (HTTP and gRPC) go through `forward`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from typing import Awaitable, Callable, TypeVar

from gateway.router.fleet import Fleet, Instance
from gateway.router.metrics import RouterMetrics
from gateway.router.policy import Candidate, Reason, decide

log = logging.getLogger(__name__)

T = TypeVar("T")


class ConnectFailed(Exception):
    """The instance refused or dropped the connection before the request was sent: safe to send elsewhere."""


class NoInstance(Exception):
    """No healthy instance can take the request; the message says why (503)."""


class RateMeter:
    """Requests per second per model, exponentially decayed over `window_s` (no per-request history kept)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._counts: dict[str, tuple[float, float]] = {}  # model -> (decayed count, when)

    def hit(self, model: str) -> float:
        """Count one request for `model`; its rate now, this request included."""
        now = self.clock()
        count, then = self._counts.get(model, (0.0, now))
        count = count * math.exp(-(now - then) / self.window_s) + 1.0
        if len(self._counts) > _MAX_METERED and model not in self._counts:
            self._forget_idle(now)
        self._counts[model] = (count, now)
        return count / self.window_s

    def _forget_idle(self, now: float) -> None:
        for model, (count, then) in list(self._counts.items()):
            if count * math.exp(-(now - then) / self.window_s) < 0.01:
                del self._counts[model]


_MAX_METERED = 10_000  # models with a rate kept before idle ones are dropped


class RoutingTable:
    def __init__(self, fleet: Fleet, metrics: RouterMetrics, strategy: str, spill_threshold: int,
                 affinity: bool = True, rng: random.Random | None = None, spill_rate: float = 0.0,
                 meter: RateMeter | None = None) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.strategy = strategy
        self.spill_threshold = spill_threshold
        self.spill_rate = spill_rate
        self.affinity = affinity
        self.rng = rng or random.Random()
        self.meter = meter or RateMeter()

    def pick(self, model: str | None, exclude: set[str]) -> tuple[Instance, Reason]:
        candidates = [Candidate(i.name, i.outstanding, i.free_bytes, model is not None and i.holds(model))
                      for i in self.fleet.healthy() if i.name not in exclude]
        rate = self.meter.hit(model) if model is not None and self.spill_rate > 0 and not exclude else 0.0
        decision = decide(model, candidates, self.strategy, self.spill_threshold, self.rng, self.affinity,
                          rate, self.spill_rate)
        if decision is None:
            raise NoInstance(self.fleet.unavailable_reason())
        instance = self.fleet.instances[decision.name]
        if model is not None and decision.reason in (Reason.HASH, Reason.SPILL):
            instance.place(model)  # concurrent requests for a cold model follow this one instead of hashing again
        return instance, decision.reason

    async def forward(self, model: str | None, attempt: Callable[[Instance], Awaitable[T]]) -> tuple[Instance, T]:
        """Run `attempt` on the chosen instance while counting it outstanding; once more elsewhere if the
        connection was refused. Raises NoInstance, or whatever `attempt` raises."""
        excluded: set[str] = set()
        while True:
            instance, reason = self.pick(model, excluded)
            self.metrics.decision((Reason.FAILOVER if excluded else reason).value)
            instance.outstanding += 1
            gauge = self.metrics.outstanding.labels(instance.name)
            gauge.inc()
            try:
                return instance, await attempt(instance)
            except ConnectFailed as exc:
                self.metrics.errors.labels("connect").inc()
                self.fleet.mark_down(instance, f"connection failed: {exc}")
                if excluded:
                    log.warning("router.failover_failed", extra={"instances": sorted(excluded | {instance.name})})
                    raise NoInstance("two gateway instances in turn refused the connection") from None
                excluded.add(instance.name)
            finally:
                instance.outstanding -= 1
                gauge.dec()

    async def broadcast(self, attempt: Callable[[Instance], Awaitable[T]]) -> list[tuple[Instance, T | BaseException]]:
        """Run `attempt` on every healthy instance at once (an unload must reach every copy); each result or
        exception with its instance. A refused connection takes its instance out, as in `forward`."""
        instances = self.fleet.healthy()
        if not instances:
            raise NoInstance(self.fleet.unavailable_reason())

        async def one(instance: Instance) -> T:
            instance.outstanding += 1
            try:
                return await attempt(instance)
            except ConnectFailed as exc:
                self.metrics.errors.labels("connect").inc()
                self.fleet.mark_down(instance, f"connection failed: {exc}")
                raise
            finally:
                instance.outstanding -= 1

        results = await asyncio.gather(*(one(i) for i in instances), return_exceptions=True)
        return list(zip(instances, results))

    def learned(self, instance: Instance, model: str | None) -> None:
        """The instance served `model`: it holds it (it may have been a spill or a failover target)."""
        if model is not None and instance.name in self.fleet.instances:
            instance.place(model)

    def forgot(self, instance: Instance, model: str | None) -> None:
        """The instance unloaded `model` on a client's request."""
        if model is not None:
            instance.models.pop(model, None)
