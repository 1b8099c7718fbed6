"""The memory budget, kept: admission before a load, enforcement after it, growth while models serve.

Every rule here exists because a softer one broke the budget under load (the issue "The memory budget holds
on a real GPU"):
- a load reserves its estimate (`gateway.ledger`) before it starts, within the budget and the device's real
  free memory less a reserve; idle models are evicted in policy order to make room, the reservation taken
  only once they are gone; busy models holding the memory past `admission_wait_s` make it a 503 (retry),
  a model that cannot fit even alone a 507;
- at most `max_concurrent_loads` loads run at once, and the first model of a class nobody has measured loads
  alone, so that the next ones are admitted on its measurement instead of the same blind guess;
- after the load the measured footprint replaces the reservation and an overshoot evicts at once; a model
  that alone measures over the budget is unloaded and refused;
- loaded models are measured again in the background and right after their first request; growth is
  enforced like any overshoot;
- a real out-of-memory failure unloads one idle model per retry (the budget can be wrong: other processes
  share the GPU), so idle models never hold the memory while every new load fails;
- a model with callers waiting on its load is never a victim; one younger than `min_residency_s` goes only
  when nothing else can (ModelMesh's churn guard).

The manager owns the records and the Triton calls; this module decides, and asks the manager to evict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator

from gateway.config import FIELDS as SETTINGS
from gateway.config import Settings, default
from gateway.errors import GatewayError, InsufficientMemory, MemoryBusy
from gateway.footprint import Meter
from gateway.ledger import Estimate, FootprintLedger
from gateway.memory import MemoryProbe
from gateway.metrics import Metrics
from gateway.policy import EvictionPolicy
from gateway.records import RESIDENT, ModelRecord, State
from gateway.staging import StagedArtifact

log = logging.getLogger(__name__)

_OOM = re.compile(r"out of memory|\bOOM\b|MemoryError|Cannot allocate memory|std::bad_alloc|CUDA_ERROR_OUT_OF_MEMORY",
                  re.IGNORECASE)

Evict = Callable[[ModelRecord, str], Awaitable[object]]
"""Unload a model this module marked UNLOADING, for the given reason (the manager's Triton call)."""


def is_out_of_memory(message: str) -> bool:
    """Whether a load failure says the device (or host) ran out of memory."""
    return _OOM.search(message) is not None


def model_class(staged: StagedArtifact) -> str:
    """What learned estimates are kept by: models of one backend, framework and instance kind."""
    return f"{staged.backend}/{staged.framework}/{staged.instance_kind}"


@dataclass(frozen=True)
class BudgetConfig:
    """The budget's knobs. A field named like a setting is that setting (`gateway.config` declares its default
    and help; `from_settings` takes them all); the others are internal."""

    memory_budget_bytes: int = 1 << 62  # as resolved by gateway.resources (the setting may be unset)
    size_factor: float = default("size_factor")  # never-measured estimate: artifact bytes x this + overhead
    instance_overhead_bytes: int = default("instance_overhead_bytes")
    admission_wait_s: float = default("admission_wait_s")  # a load waits this for busy models, then 503 (retry)
    max_concurrent_loads: int = default("max_concurrent_loads")
    min_residency_s: float = default("min_residency_s")  # a younger model is evicted only when nothing else can go
    device_check: bool = True  # also fit the device's real free memory (NVML, or the host's MemAvailable)
    device_reserve_bytes: int = default("device_reserve_bytes")  # device memory never promised to a model
    remeasure_interval_s: float = default("remeasure_interval_s")
    growth_tolerance_bytes: int = 2 << 20  # growth below max(this, growth_tolerance x footprint) is noise
    growth_tolerance: float = 0.01

    @classmethod
    def from_settings(cls, settings: Settings, memory_budget_bytes: int, **overrides: Any) -> BudgetConfig:
        """Every setting the budget takes, from `settings`, with the memory budget as resolved."""
        taken = {f.name: getattr(settings, f.name) for f in fields(cls) if f.name in SETTINGS}
        return cls(**{**taken, "memory_budget_bytes": memory_budget_bytes, **overrides})


class MemoryBudget:
    """Decides what fits and what goes, over the manager's records."""

    def __init__(self, records: dict[str, ModelRecord], policy: EvictionPolicy, probe: MemoryProbe, meter: Meter,
                 ledger: FootprintLedger, metrics: Metrics, config: BudgetConfig, evict: Evict,
                 changed: Callable[[], None], stub_missing: Callable[[ModelRecord], None] | None = None) -> None:
        self._stub_missing = stub_missing  # a loaded stub-backed model whose process is gone (killed, crashed)
        self._records = records  # the manager's own table, read here, never added to
        self.policy = policy
        self.probe = probe
        self.meter = meter
        self.ledger = ledger
        self.metrics = metrics
        self.config = config
        self._evict = evict
        self._changed = changed  # gauges to update
        self._idle = asyncio.Event()  # set when a model's last lease ends: blocked admissions look again
        self._measure_now = asyncio.Event()  # wakes the background measurement before its interval
        self._load_slots = asyncio.Semaphore(max(config.max_concurrent_loads, 1))
        self._loads_in_flight = 0
        self._first_of_class = asyncio.Lock()
        self._probed_classes: set[str] = set()
        metrics.memory_budget.set(config.memory_budget_bytes)

    @property
    def budget_bytes(self) -> int:
        return self.config.memory_budget_bytes

    def committed_bytes(self) -> int:
        """Memory of models loaded, loading or not yet confirmed unloaded."""
        return sum(r.footprint_bytes for r in self._records.values() if r.state in RESIDENT)

    def model_idle(self) -> None:
        """A model's last request ended: loads waiting for room look again."""
        self._idle.set()

    def first_use(self) -> None:
        """A model served its first request since its load: measure now, it grows most then."""
        self._measure_now.set()

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.config.admission_wait_s

    # -- admission ---------------------------------------------------------------------------------------

    def _refuse(self, reason: str, exc: GatewayError) -> GatewayError:
        self.metrics.memory_refusals.labels(reason=reason).inc()
        return exc

    def refuse_if_too_large(self, rec: ModelRecord, estimate: Estimate) -> None:
        """507 at once, without a load slot or a load, for a model that cannot fit even alone."""
        if estimate.bytes > self.budget_bytes:
            what = "measured once loaded" if estimate.source == "ledger" else f"estimated ({estimate.source})"
            raise self._refuse("model_too_large", InsufficientMemory(
                f"model {rec.model.key!r} needs {estimate.bytes} bytes ({what}), more than the whole memory budget "
                f"of {self.budget_bytes} bytes"))

    def estimate(self, staged: StagedArtifact) -> Estimate:
        """What a load of `staged` reserves (see `FootprintLedger.estimate`): never more than the budget
        unless it is this artifact's own measurement."""
        per_instance = int(staged.artifact_bytes * self.config.size_factor) + self.config.instance_overhead_bytes
        return self.ledger.estimate(staged.etag, model_class(staged), staged.instance_count, per_instance,
                                    ceiling=self.budget_bytes)

    def _device_room(self, rec: ModelRecord) -> int | None:
        """Bytes the device itself can still give this load: its free memory less the reserve and less what
        other loads in flight reserved but have not allocated yet. None when the probe cannot say."""
        if not self.config.device_check:
            return None
        try:
            free = self.probe.device().free_bytes
        except Exception as exc:  # a probe hiccup must not stop loads: the budget still holds
            log.warning("memory.device_unreadable", extra={"error": str(exc)})
            return None
        pending = sum(r.footprint_bytes for r in self._records.values()
                      if r.state is State.LOADING and r is not rec and r.footprint_source != "measured")
        return free - self.config.device_reserve_bytes - pending

    def _shortfall(self, rec: ModelRecord, need: int) -> tuple[int, str]:
        """Bytes to free before `need` more fit, and which limit is short: the budget or the device."""
        budget_short = need - (self.budget_bytes - self.committed_bytes())
        room = self._device_room(rec)
        device_short = need - room if room is not None else 0
        return (device_short, "device_memory") if device_short > budget_short else (budget_short, "memory_pressure")

    def _others_hold_memory(self, rec: ModelRecord) -> bool:
        """Whether some other model of ours holds or is about to hold memory (so waiting can help)."""
        return any(r is not rec and r.state in RESIDENT for r in self._records.values())

    def _idle_victims(self, rec: ModelRecord | None) -> list[ModelRecord]:
        """Models that may be unloaded now, best first: the policy's order, models younger than the minimum
        residency last (ModelMesh's churn guard). A model with callers waiting on its load is theirs first."""
        idle = {
            r.name: r for r in self._records.values()
            if r.state is State.READY and r.leases == 0 and r.waiters == 0 and r is not rec
            and (r.pipeline is None or r.pipeline.done())
        }
        ordered = [idle[name] for name in self.policy.victims(list(idle))]
        young_after = time.monotonic() - self.config.min_residency_s
        return [r for r in ordered if r.loaded_at <= young_after] + [r for r in ordered if r.loaded_at > young_after]

    def _choose_victims(self, rec: ModelRecord | None, shortfall: int) -> list[ModelRecord] | None:
        """Idle models whose memory covers `shortfall` bytes, marked UNLOADING; [] if nothing is short, None
        if even all idle models would not do. Synchronous on purpose: nothing runs between choice and mark."""
        if shortfall <= 0:
            return []
        chosen: list[ModelRecord] = []
        freed = 0
        for victim in self._idle_victims(rec):
            chosen.append(victim)
            freed += victim.footprint_bytes
            if freed >= shortfall:
                break
        if freed < shortfall:
            return None
        for victim in chosen:
            victim.state = State.UNLOADING  # still counted as used until Triton confirms the unload
        return chosen

    async def _wait_idle(self, deadline: float) -> bool:
        """Wait until some model's last request ends (or the deadline); False once the deadline has passed."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        self._idle.clear()  # woken the moment some model's last request ends, not by polling
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=min(remaining, 0.5))
        return True

    async def _admit(self, rec: ModelRecord, estimate: Estimate) -> None:
        """Reserve `estimate` bytes for `rec`, evicting idle models by the policy until it fits both the
        budget and the device; 507 when it can never fit, 503 (retry) when busy models hold the memory."""
        need, budget = estimate.bytes, self.budget_bytes
        self.refuse_if_too_large(rec, estimate)
        deadline = asyncio.get_running_loop().time() + self.config.admission_wait_s
        evicted: list[str] = []
        while True:
            shortfall, limit = self._shortfall(rec, need)
            victims = self._choose_victims(rec, shortfall)
            if victims == []:
                break
            if victims:
                # Reserve only once the victims are gone: used memory, reservations included, never tops the budget.
                await asyncio.gather(*(self._evict(v, limit) for v in victims))
                evicted += [v.model.key for v in victims]
                continue
            if limit == "device_memory" and not self._others_hold_memory(rec):
                raise self._refuse("device_full", InsufficientMemory(
                    f"model {rec.model.key!r} needs {need} bytes but the device has only {need - shortfall} bytes "
                    f"free beyond the {self.config.device_reserve_bytes}-byte reserve, and no model of this gateway "
                    "holds any: other processes use the rest"))
            if not await self._wait_idle(deadline):
                raise self._refuse("memory_busy", MemoryBusy(
                    f"model {rec.model.key!r} needs {need} bytes but only {need - shortfall} can be had now "
                    f"({limit.replace('_', ' ')}): the models holding the rest are serving requests or loading; "
                    "retry shortly"))
        rec.state, rec.footprint_bytes, rec.footprint_source = State.LOADING, need, estimate.source  # the reservation
        self._changed()
        log.info("model.admitted", extra={"model": rec.model.key, "need_bytes": need, "estimate_source": estimate.source,
                                          "evicted": evicted, "committed_bytes": self.committed_bytes(),
                                          "budget_bytes": budget})

    def _unmeasured(self, staged: StagedArtifact, cls: str) -> bool:
        """Nothing is known of this artifact's memory. A class whose probe loaded but could not be measured
        (a CPU model under NVML, a Triton elsewhere) is not probed again: its loads would queue forever."""
        return (self.ledger.get(staged.etag) is None and not self.ledger.knows_class(cls)
                and cls not in self._probed_classes)

    async def _probe_class(self, staged: StagedArtifact, cls: str) -> bool:
        """The first model of a class nobody has measured loads alone: its measurement teaches the estimate
        of the next ones, which would otherwise all be admitted at once on the same blind guess. Returns
        whether this load is that probe (and holds the lock); loads that waited behind a probe go on at once."""
        if not self._unmeasured(staged, cls):
            return False
        await self._first_of_class.acquire()
        if self._unmeasured(staged, cls):
            return True
        self._first_of_class.release()
        return False

    @contextlib.asynccontextmanager
    async def load_turn(self, rec: ModelRecord, staged: StagedArtifact) -> AsyncIterator[None]:
        """A load's turn: the class probe if it is one, a load slot, then its reservation (`rec` LOADING)."""
        probing = await self._probe_class(staged, rec.model_class)
        try:
            async with self._load_slots:
                self._loads_in_flight += 1
                self.metrics.loads_in_flight.set(self._loads_in_flight)
                log.info("model.load_started", extra={"model": rec.model.key, "loads_in_flight": self._loads_in_flight})
                try:
                    await self._admit(rec, self.estimate(staged))
                    yield
                finally:
                    self._loads_in_flight -= 1
                    self.metrics.loads_in_flight.set(self._loads_in_flight)
        finally:
            if probing:
                if rec.state is State.LOADING:  # it loaded, measured or not: the class has had its probe
                    self._probed_classes.add(rec.model_class)
                self._first_of_class.release()

    # -- after the load ------------------------------------------------------------------------------------

    def account_load(self, rec: ModelRecord, measured: int) -> None:
        """Account what the model will hold once it serves, not only what it holds now: what this artifact
        grew to before (the ledger), else the measurement times its class's learned growth, until its first
        measurement in use replaces the guess (`remeasure`)."""
        known = self.ledger.get(rec.etag) if rec.etag else None
        if known is not None:
            accounted = max(measured, known)
        else:
            accounted = max(measured, int(measured * self.ledger.growth(rec.model_class)))
        if rec.etag:
            self.ledger.record(rec.etag, measured, rec.model_class, rec.instances, just_loaded=True)
        rec.loaded_bytes, rec.padded = measured, accounted > measured
        rec.footprint_bytes, rec.footprint_source = min(accounted, max(measured, self.budget_bytes)), "measured"

    async def settle(self, rec: ModelRecord, unload: Callable[[ModelRecord], Awaitable[None]]) -> None:
        """Enforce the budget on the measured footprint before the model is served: a model that alone
        exceeds it is unloaded and refused (507, remembered through the ledger); otherwise idle models go
        until everything fits again, or, if busy models hold the memory past the wait, this one goes (503)."""
        budget = self.budget_bytes
        if rec.footprint_bytes > budget:  # measured alone over it: accounted growth is capped at the budget
            await unload(rec)
            raise self._refuse("model_too_large", InsufficientMemory(
                f"model {rec.model.key!r} measured {rec.footprint_bytes} bytes once loaded, more than the whole "
                f"memory budget of {budget} bytes"))
        deadline = asyncio.get_running_loop().time() + self.config.admission_wait_s
        while (over := self.committed_bytes() - budget) > 0:
            victims = self._choose_victims(rec, over)
            if victims:
                log.info("memory.over_budget_after_load", extra={"model": rec.model.key, "over_bytes": over,
                                                                 "evicting": [v.model.key for v in victims]})
                await asyncio.gather(*(self._evict(v, "measured_over_budget") for v in victims))
            elif not await self._wait_idle(deadline):
                await unload(rec)
                raise self._refuse("memory_busy", MemoryBusy(
                    f"model {rec.model.key!r} measured {rec.footprint_bytes} bytes once loaded, {over} more than "
                    "the memory budget has left, and the other models kept serving requests; retry shortly"))

    async def after_out_of_memory(self, rec: ModelRecord, error: str, deadline: float) -> None:
        """A load of `rec` failed for memory: unload one idle model (policy order) so the retry may fit, or
        wait for a busy one to go idle; when nothing of ours can give memory, refuse."""
        victims = self._idle_victims(rec)
        log.warning("model.load_oom", extra={"model": rec.model.key, "error": error,
                                             "evicting": victims[0].model.key if victims else None})
        if victims:
            victims[0].state = State.UNLOADING
            await self._evict(victims[0], "out_of_memory")
            return
        if self._others_hold_memory(rec) and await self._wait_idle(deadline):
            return
        if self._others_hold_memory(rec):
            raise self._refuse("memory_busy", MemoryBusy(
                f"model {rec.model.key!r} ran out of memory loading while the other loaded models kept serving "
                f"requests; retry shortly ({error})"))
        raise self._refuse("out_of_memory", InsufficientMemory(
            f"model {rec.model.key!r} ran out of memory loading with no other model of this gateway loaded "
            f"(estimate {rec.footprint_bytes} bytes, budget {self.budget_bytes} bytes): {error}"))

    # -- while models serve ----------------------------------------------------------------------------------

    def _grew(self, before: int, now: int) -> bool:
        """Growth worth accounting: above measurement noise (allocator pages come and go by the MiB)."""
        return now > before + max(self.config.growth_tolerance_bytes, int(before * self.config.growth_tolerance))

    async def remeasure(self) -> None:
        """Measure every loaded stub-backed model again; growth counts against the budget at once and idle
        models are evicted to make up for it, like any other overshoot."""
        ready = [r for r in self._records.values() if r.state is State.READY]
        if not ready:
            return
        sizes = await asyncio.to_thread(self.meter.stub_bytes, [r.name for r in ready])
        grown = []
        for rec in ready:
            now = sizes.get(rec.name)
            if rec.state is State.READY and now is None and self._stub_missing is not None and (
                    rec.model_class.startswith("python/") and getattr(self.meter, "sees_stubs", False)):
                self._stub_missing(rec)  # found before a request hangs on it
            if rec.state is not State.READY or not now:
                continue
            if rec.padded and rec.used_since_measured:  # the first real number in use replaces the guess
                rec.padded = False
                rec.footprint_bytes = max(now, rec.loaded_bytes)
                if rec.etag:
                    self.ledger.record(rec.etag, now, rec.model_class, rec.instances)
            if self._grew(rec.footprint_bytes, now):
                log.info("model.grew", extra={"model": rec.model.key, "from_bytes": rec.footprint_bytes, "to_bytes": now})
                rec.footprint_bytes, rec.footprint_source = now, "measured"
                if rec.etag:
                    self.ledger.record(rec.etag, now, rec.model_class, rec.instances)
                grown.append(rec)
        if grown:
            self._changed()
            await self._enforce("growth")

    async def _enforce(self, reason: str) -> None:
        """Evict idle models until committed memory is within the budget again; a model that alone exceeds
        the whole budget goes first. What busy models hold is taken back on the next pass."""
        budget = self.budget_bytes
        while (over := self.committed_bytes() - budget) > 0:
            too_large = [r for r in self._idle_victims(None) if r.footprint_bytes > budget]
            if too_large:
                too_large[0].state = State.UNLOADING
                victims: list[ModelRecord] | None = too_large[:1]
            else:
                victims = self._choose_victims(None, over) or self._choose_victims(None, 1)
            if not victims:
                log.warning("memory.over_budget", extra={"over_bytes": over, "reason": reason,
                                                         "committed_bytes": self.committed_bytes(), "budget_bytes": budget})
                return
            await asyncio.gather(*(self._evict(v, reason) for v in victims))

    async def watch(self) -> None:
        """Re-measure loaded models every `remeasure_interval_s` (cheap: one /proc walk, one NVML call), and
        at once after a model's first request since its load."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._measure_now.wait(), timeout=self.config.remeasure_interval_s)
            self._measure_now.clear()
            try:
                await self.remeasure()
            except Exception:
                log.exception("memory.remeasure_failed")

    def learn_before_unload(self, rec: ModelRecord, now: int | None) -> None:
        """What a model holds as it is unloaded: growth since the last pass is news for the ledger."""
        if now and rec.etag:
            self.ledger.record(rec.etag, now, rec.model_class, rec.instances)
