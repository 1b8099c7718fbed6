"""Health checks and model listings: one loop per instance.

Every `health_interval_s` the instance's `/v2/health/ready` is read; `unhealthy_after` failures in a row
take it out (a refused connection on a request takes it out at once, see `table`), one success puts it back.
Every `listing_interval_s` the router lists what it holds (`POST /v2/repository/index`: models READY or
LOADING) and reads its free model memory from `/metrics` (budget less used), with the router's own API key
when one is set. A model the listing no longer shows is forgotten unless the router placed it there within
the last listing interval (its load may not show yet).
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from gateway.router.fleet import Fleet, Instance
from gateway.router.metrics import RouterMetrics

log = logging.getLogger(__name__)

HOLDING_STATES = {"READY", "LOADING"}


def free_memory(metrics_text: str) -> float | None:
    """mme_memory_budget_bytes - mme_memory_used_bytes from a gateway's /metrics, None when absent."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name in ("mme_memory_budget_bytes", "mme_memory_used_bytes") and family.samples:
            values[family.name] = family.samples[0].value
    if len(values) < 2:
        return None
    return max(values["mme_memory_budget_bytes"] - values["mme_memory_used_bytes"], 0.0)


def held_models(index: object) -> set[str]:
    """The names in a KServe repository index that are loaded or loading."""
    if not isinstance(index, list):
        raise ValueError("repository index is not a list")
    return {row["name"] for row in index if isinstance(row, dict) and row.get("state") in HOLDING_STATES}


class Prober:
    def __init__(self, fleet: Fleet, metrics: RouterMetrics, session: aiohttp.ClientSession, *,
                 health_interval_s: float, listing_interval_s: float, timeout_s: float, unhealthy_after: int,
                 api_key: str | None) -> None:
        self.fleet = fleet
        self.metrics = metrics
        self.session = session
        self.health_interval_s = health_interval_s
        self.listing_interval_s = listing_interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.unhealthy_after = unhealthy_after
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._listed: dict[str, float] = {}  # instance -> monotonic time of its last listing
        self._refused_listing: set[str] = set()

    def watch(self, instance: Instance) -> None:
        self._tasks[instance.name] = asyncio.create_task(self._run(instance))

    def unwatch(self, instance: Instance) -> None:
        task = self._tasks.pop(instance.name, None)
        if task is not None:
            task.cancel()
        self._listed.pop(instance.name, None)
        self.metrics.forget(instance.name)

    def relist(self, instance: Instance) -> None:
        """List this instance at its next health check (it just came back)."""
        self._listed.pop(instance.name, None)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, instance: Instance) -> None:
        while True:
            try:
                await self.check(instance)
            except Exception:  # a bug here must not stop this instance's checks for good
                log.exception("router.check_failed", extra={"instance": instance.name})
            await asyncio.sleep(self.health_interval_s)

    async def check(self, instance: Instance) -> None:
        """One health check, and a listing when one is due; never raises."""
        try:
            ok = await self._ready(instance)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            ok, why = False, repr(exc)
        else:
            why = "not ready"
        if ok:
            instance.failures = 0  # consecutive failures only
            self.fleet.mark_up(instance)
        else:
            instance.failures += 1
            if instance.failures >= self.unhealthy_after:
                self.fleet.mark_down(instance, f"{instance.failures} failed health checks ({why})")
        if instance.healthy and time.monotonic() - self._listed.get(instance.name, 0.0) >= self.listing_interval_s:
            await self.list_models(instance)
        self.metrics.healthy.labels(instance.name).set(1 if instance.healthy else 0)
        self.metrics.instance_models.labels(instance.name).set(len(instance.models))

    async def _ready(self, instance: Instance) -> bool:
        async with self.session.get(instance.http_base + "/v2/health/ready", timeout=self.timeout) as resp:
            await resp.read()
            return resp.status == 200

    async def list_models(self, instance: Instance) -> None:
        started = time.monotonic()
        try:
            async with self.session.post(instance.http_base + "/v2/repository/index", json={}, headers=self.auth,
                                         timeout=self.timeout) as resp:
                if resp.status in (401, 403):
                    if instance.name not in self._refused_listing:
                        self._refused_listing.add(instance.name)
                        log.warning("router.listing_refused", extra={
                            "instance": instance.name, "status": resp.status,
                            "hint": "set --upstream-api-key to a key with the manage scope; until then the router "
                                    "learns placements from answers only"})
                    held = None
                else:
                    resp.raise_for_status()
                    held = held_models(await resp.json(content_type=None))
            async with self.session.get(instance.http_base + "/metrics", headers=self.auth,
                                        timeout=self.timeout) as resp:
                free = free_memory(await resp.text()) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, KeyError) as exc:
            log.info("router.listing_failed", extra={"instance": instance.name, "error": repr(exc)})
            return
        self._listed[instance.name] = time.monotonic()
        instance.free_bytes = free
        if held is None:
            return
        grace_start = started - self.listing_interval_s
        for model in [m for m, seen in instance.models.items() if m not in held and seen < grace_start]:
            del instance.models[model]
        for model in held:
            instance.models[model] = started
