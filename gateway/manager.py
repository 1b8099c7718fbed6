"""The model lifecycle: one owner for every model's state, single-flight loads, leases, memory admission.

States: absent -> staging -> staged -> loading -> ready -> unloading (-> staged), plus failed (remembered
per ETag so a bad artifact is refused at once until it is replaced in the store).

- Single flight: at most one pipeline per model is in flight (one asyncio Task); every concurrent caller
  awaits that task with its own bound, never a lock shared by all models (Ray Serve's replica-wide lock
  serialised every load, ray #65346). A caller that gives up leaves the pipeline running in the
  background, as SageMaker does, and gets "not ready yet, retry".
- Leases: every request holds a lease on its model for its whole duration; a model with leases is never
  unloaded, so no request ever races an eviction (Seldon retries on 404 instead).
- The memory budget holds, because it is enforced on measurements (ModelMesh's size x 1.25 is its users'
  top complaint): a load reserves its estimate (the ledger's measurement of that artifact, else what was
  learned for its class, else artifact size x factor) before it starts, within the budget and the device's
  real free memory; idle models are evicted by the policy to make room. After the load the footprint is
  measured, and an overshoot evicts at once; loaded models are re-measured in the background and growth is
  enforced the same way. Loads run at most `max_concurrent_loads` at a time, the first of an unmeasured
  class alone. A real out-of-memory load failure evicts one idle model per retry. An unloading model's
  memory counts as used until Triton's index no longer shows it (modelmesh-serving #455).
- A load finished for waiting callers is theirs first: a model with callers waiting on its pipeline is
  never a victim, and a model younger than `min_residency_s` goes only when nothing else can.
- Triton's own index is the ground truth for what is loaded: it is reconciled at start and after Triton
  restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import AsyncIterator

from gateway.errors import (
    GatewayError,
    InsufficientMemory,
    InvalidArtifact,
    ModelAlreadyExists,
    ModelBusy,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    MemoryBusy,
    Throttled,
)
from gateway.footprint import Meter
from gateway.ledger import Estimate, FootprintLedger
from gateway.memory import MemoryProbe
from gateway.metrics import Metrics
from gateway.naming import ModelKey, model_key
from gateway.policy import EvictionPolicy
from gateway.staging import StagedArtifact, StagingArea
from gateway.store.base import ArtifactStore, ObjectInfo
from gateway.store.path import PathSource
from gateway.triton.control import TritonControl

log = logging.getLogger(__name__)

_OOM = re.compile(r"out of memory|\bOOM\b|MemoryError|Cannot allocate memory|std::bad_alloc|CUDA_ERROR_OUT_OF_MEMORY",
                  re.IGNORECASE)
_POLL_S = 0.02


def _consume_exception(task: asyncio.Task[None]) -> None:
    """A pipeline whose callers all gave up still ends; its error was logged, so do not warn again."""
    if not task.cancelled():
        task.exception()


class State(str, Enum):
    ABSENT = "absent"
    STAGING = "staging"
    STAGED = "staged"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


_RESIDENT = (State.LOADING, State.READY, State.UNLOADING)  # states whose memory counts against the budget


@dataclass
class ModelRecord:
    """Everything the gateway knows about one model."""

    model: ModelKey
    state: State = State.ABSENT
    etag: str | None = None
    artifact_bytes: int = 0
    footprint_bytes: int = 0  # measured after a load, else the estimate it was admitted with
    footprint_source: str | None = None  # "measured" | "ledger" | "size_x_factor"
    leases: int = 0
    hits: int = 0
    misses: int = 0
    last_used: float = 0.0
    loaded_at: float = 0.0  # monotonic time the current load finished
    used_since_measured: bool = False  # served since its load was measured: growth to look for at once
    loaded_bytes: int = 0  # measured right after the load, before any request
    padded: bool = False  # footprint_bytes includes growth expected from the class, not yet measured
    waiters: int = 0  # callers awaiting this model's pipeline: a model they wait for is not a victim
    served_since_load: int = 0
    model_class: str = ""  # backend/framework/instance kind: what learned estimates are kept by
    instances: int = 1
    checked_at: float = 0.0  # monotonic time of the last store HEAD that confirmed `etag`
    download_s: float | None = None
    load_s: float | None = None
    error: GatewayError | None = None
    source: ArtifactStore | None = None  # set for models registered by path (container API); else the store
    pipeline: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.model.triton_name


@dataclass(frozen=True)
class ManagerConfig:
    wait_timeout_s: float = 60.0  # SageMaker answers within 60 s and keeps loading in the background
    etag_ttl_s: float = 30.0  # how long a staged/loaded version is trusted before the store is asked again
    memory_budget_bytes: int = 1 << 62
    size_factor: float = 2.0
    instance_overhead_bytes: int = 96 << 20
    model_cache_enabled: bool = True  # SageMaker's ModelCacheSetting
    max_concurrency: int | None = None
    queue_timeout_s: float = 10.0
    admission_wait_s: float = 10.0  # how long a load waits for busy models to go idle before 503 (retry)
    max_concurrent_loads: int = 2
    min_residency_s: float = 2.0  # a younger model is evicted only when nothing else can go
    device_check: bool = True  # also fit the device's real free memory (NVML, or the host's MemAvailable)
    device_reserve_bytes: int = 256 << 20  # device memory never promised to a model
    remeasure_interval_s: float = 2.0
    growth_tolerance_bytes: int = 2 << 20  # growth below max(this, growth_tolerance x footprint) is noise
    growth_tolerance: float = 0.01


def model_class(staged: StagedArtifact) -> str:
    """What learned estimates are kept by: models of one backend, framework and instance kind."""
    return f"{staged.backend}/{staged.framework}/{staged.instance_kind}"


class ModelManager:
    """Owns model state; adapters call `lease()` and never touch the lifecycle otherwise."""

    def __init__(
        self,
        store: ArtifactStore,
        staging: StagingArea,
        control: TritonControl,
        metrics: Metrics,
        policy: EvictionPolicy,
        probe: MemoryProbe,
        meter: Meter,
        ledger: FootprintLedger,
        config: ManagerConfig = ManagerConfig(),
    ) -> None:
        self.store = store
        self.staging = staging
        self.control = control
        self.metrics = metrics
        self.policy = policy
        self.probe = probe
        self.meter = meter
        self.ledger = ledger
        self.config = config
        self._records: dict[str, ModelRecord] = {}
        self._registered: dict[str, str] = {}  # container-API model name -> Triton name
        self._slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self._measure_lock = asyncio.Lock()  # device-wide deltas are only meaningful one load at a time
        self._load_slots = asyncio.Semaphore(max(config.max_concurrent_loads, 1))
        self._loads_in_flight = 0
        self._first_of_class = asyncio.Lock()
        self._probed_classes: set[str] = set()
        self._measure_soon = asyncio.Event()  # wakes the background measurement before its interval
        self._idle = asyncio.Event()  # set when a model's last lease ends: blocked admissions look again
        self._hit = metrics.cache_requests.labels(result="hit")  # labels() costs microseconds per request
        self._miss = metrics.cache_requests.labels(result="miss")
        self._background: set[asyncio.Task[None]] = set()
        metrics.memory_budget.set(config.memory_budget_bytes)
        if staging.budget_bytes is not None:
            metrics.disk_budget.set(staging.budget_bytes)

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def memory_budget_bytes(self) -> int:
        return self.config.memory_budget_bytes

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def record(self, key: str) -> ModelRecord | None:
        return self._records.get(self._resolve(key).triton_name)

    def committed_bytes(self) -> int:
        """Memory of models loaded, loading or not yet confirmed unloaded."""
        return sum(r.footprint_bytes for r in self._records.values() if r.state in _RESIDENT)

    def _resolve(self, key: str) -> ModelKey:
        """A registered name wins over a store key of the same spelling."""
        name = self._registered.get(key)
        if name is not None and name in self._records:
            return self._records[name].model
        return model_key(key, self.store.url)

    def _source(self, rec: ModelRecord) -> ArtifactStore:
        return rec.source or self.store

    def _record(self, model: ModelKey) -> ModelRecord:
        rec = self._records.get(model.triton_name)
        if rec is None:
            rec = self._records[model.triton_name] = ModelRecord(model=model)
        return rec

    def _update_gauges(self) -> None:
        self.metrics.loaded_models.set(sum(1 for r in self._records.values() if r.state is State.READY))
        self.metrics.memory_used.set(self.committed_bytes())
        self.metrics.disk_used.set(self.staging.used_bytes())
        with contextlib.suppress(Exception):  # a probe hiccup must not break a load or an eviction
            self.metrics.device_memory_used.set(self.probe.device().used_bytes)

    # -- the request path --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, key: str, wait_timeout_s: float | None = None) -> AsyncIterator[ModelRecord]:
        """Make `key` ready (staging and loading it if needed) and hold it loaded while the block runs."""
        model = self._resolve(key)
        if self._slots is not None:
            await self._take_slot(model)
        try:
            rec = await self._acquire(model, self.config.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)
            self.metrics.in_flight.inc()
            try:
                yield rec
            finally:
                rec.leases -= 1
                rec.last_used = time.monotonic()
                self.metrics.in_flight.dec()
                if rec.leases == 0:
                    self._idle.set()
                if not rec.used_since_measured:  # a first request grows a model most (arenas, lazy imports)
                    rec.used_since_measured = True
                    self._measure_soon.set()
                if not self.config.model_cache_enabled and rec.leases == 0 and rec.source is None:
                    self._spawn(self._evict(rec, reason="cache_disabled", delete=True))
        finally:
            if self._slots is not None:
                self._slots.release()

    async def _take_slot(self, model: ModelKey) -> None:
        """The concurrent-invocation cap (the profile's vCPUs): wait for a slot, then 429."""
        assert self._slots is not None
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self.config.queue_timeout_s)
        except asyncio.TimeoutError:
            raise Throttled(
                f"all {self.config.max_concurrency} invocation slots stayed busy for {self.config.queue_timeout_s:.0f}s "
                f"(model {model.key!r}); retry with backoff"
            ) from None

    async def ensure_ready(self, key: str, wait_timeout_s: float | None = None) -> ModelRecord:
        """Load `key` without holding it (metadata calls, explicit loads)."""
        model = self._resolve(key)
        rec = await self._acquire(model, self.config.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)
        rec.leases -= 1
        rec.last_used = time.monotonic()
        return rec

    async def _acquire(self, model: ModelKey, wait_timeout_s: float) -> ModelRecord:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + wait_timeout_s
        rec = self._record(model)
        hit = rec.state is State.READY  # SageMaker's ModelCacheHit: loaded when the invocation arrived
        confirmed = False  # a pipeline this caller awaited has just checked the store
        while True:
            if rec.state is State.READY and (confirmed or not self._stale(rec)):
                rec.leases += 1  # no await between the check and the increment: eviction cannot slip in
                rec.served_since_load += 1
                (self._hit if hit else self._miss).inc()
                if hit:
                    rec.hits += 1
                    self.policy.record_hit(rec.name)
                else:
                    rec.misses += 1
                    self.metrics.loading_wait.observe(loop.time() - started)
                return rec
            task = rec.pipeline
            if task is None or task.done():
                task = rec.pipeline = asyncio.create_task(self._pipeline(rec), name=f"pipeline:{model.triton_name}")
                task.add_done_callback(_consume_exception)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelNotReady(f"model {model.key!r} is still loading; retry shortly")
            rec.waiters += 1  # the load is this caller's first: no eviction until it has taken its lease
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=remaining)
            except asyncio.TimeoutError:
                raise ModelNotReady(
                    f"model {model.key!r} is not ready after {wait_timeout_s:.0f}s (state {rec.state.value}); "
                    "it keeps loading in the background, retry shortly"
                ) from None
            finally:
                rec.waiters -= 1  # and the lease is taken at the top of the loop with no await in between
            confirmed = True

    def _stale(self, rec: ModelRecord) -> bool:
        return time.monotonic() - rec.checked_at > self.config.etag_ttl_s

    # -- the load pipeline (one per model in flight) ----------------------------------------------------

    async def _pipeline(self, rec: ModelRecord) -> None:
        try:
            await self._run_pipeline(rec)
        except ModelNotFound:
            if rec.state not in _RESIDENT and rec.source is None:
                self._records.pop(rec.name, None)
            raise
        except (InvalidArtifact, ModelLoadFailed, InsufficientMemory, MemoryBusy) as exc:
            if rec.state is State.LOADING or rec.state is State.STAGED:
                # No room is not a broken artifact: a 507 is refused again from the ledger's measurement
                rec.state = State.STAGED if isinstance(exc, (InsufficientMemory, MemoryBusy)) else State.FAILED
            elif rec.state is State.STAGING:
                rec.state = State.FAILED
            rec.error = exc
            self.metrics.load_failures.labels(reason=exc.code).inc()
            log.warning("model.failed", extra={"model": rec.model.key, "etag": rec.etag, "error": exc.message})
            raise
        except BaseException as exc:  # store or Triton unreachable, cancelled: nothing is cached, retry later
            if rec.state is State.STAGING:
                rec.state = State.STAGED if self.staging.staged(rec.name) else State.ABSENT
            if isinstance(exc, GatewayError):
                self.metrics.load_failures.labels(reason=exc.code).inc()
            raise
        finally:
            self._update_gauges()

    async def _run_pipeline(self, rec: ModelRecord) -> None:
        while rec.state is State.UNLOADING:  # an eviction chose it just before this request: let it finish
            await asyncio.sleep(_POLL_S)
        staged = self.staging.staged(rec.name)
        if staged is not None and staged.etag == rec.etag and not self._stale(rec) and rec.state is not State.FAILED:
            info = ObjectInfo(key=rec.model.key, etag=staged.etag, size=staged.artifact_bytes)  # trusted (TTL)
        else:
            info = await asyncio.to_thread(self._source(rec).head, rec.model.key)
            rec.checked_at = time.monotonic()
        if rec.state is State.FAILED and rec.etag == info.etag and rec.error is not None:
            raise rec.error  # same bytes as the last failure: refuse at once instead of downloading again
        if rec.state is State.READY and rec.etag == info.etag:
            return
        if staged is None or staged.etag != info.etag:
            staged = await self._stage(rec, info)
        else:
            self.metrics.disk_hits.inc()
            log.info("model.disk_hit", extra={"model": rec.model.key, "etag": info.etag})
        await self._load(rec, staged)

    async def _stage(self, rec: ModelRecord, info: ObjectInfo) -> StagedArtifact:
        rec.state, rec.etag, rec.error = State.STAGING, info.etag, None
        log.info("model.staging", extra={"model": rec.model.key, "etag": info.etag, "bytes": info.size})
        await self._make_disk_room(2 * info.size, keep=rec.name)  # the archive and its extraction, briefly
        staged = await asyncio.to_thread(self.staging.stage, rec.model, info, self._source(rec))
        rec.state, rec.artifact_bytes, rec.download_s = State.STAGED, staged.artifact_bytes, staged.download_s
        self.metrics.downloads.inc()
        self.metrics.download_bytes.inc(staged.artifact_bytes)
        self.metrics.downloading.observe(staged.download_s)
        await self._make_disk_room(0, keep=rec.name)
        return staged

    async def _make_disk_room(self, need_bytes: int, keep: str) -> None:
        protected = {r.name for r in self._records.values() if r.state is not State.STAGED or r.leases} | {keep}
        for name in await asyncio.to_thread(self.staging.make_room, need_bytes, protected):
            self.metrics.evictions.labels(tier="disk", reason="disk_budget").inc()
            log.info("model.evicted_from_disk", extra={"triton_name": name})
        self._update_gauges()

    # -- admission and loading ------------------------------------------------------------------------------

    def _estimate(self, staged: StagedArtifact) -> Estimate:
        per_instance = int(staged.artifact_bytes * self.config.size_factor) + self.config.instance_overhead_bytes
        return self.ledger.estimate(staged.etag, model_class(staged), staged.instance_count, per_instance,
                                    ceiling=self.memory_budget_bytes)

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

    def _shortfall(self, rec: ModelRecord, need: int) -> tuple[int, str]:
        """Bytes to free before `need` more fit, and which limit is short: the budget or the device."""
        budget_short = need - (self.memory_budget_bytes - self.committed_bytes())
        room = self._device_room(rec)
        device_short = need - room if room is not None else 0
        return (device_short, "device_memory") if device_short > budget_short else (budget_short, "memory_pressure")

    def _others_hold_memory(self, rec: ModelRecord) -> bool:
        """Whether some other model of ours holds or is about to hold memory (so waiting can help)."""
        return any(r is not rec and r.state in _RESIDENT for r in self._records.values())

    async def _wait_idle(self, deadline: float) -> bool:
        """Wait until some model's last request ends (or the deadline); False once the deadline has passed."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return False
        self._idle.clear()  # woken the moment some model's last request ends, not by polling
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=min(remaining, 0.5))
        return True

    def _refuse(self, reason: str, exc: GatewayError) -> GatewayError:
        self.metrics.memory_refusals.labels(reason=reason).inc()
        return exc

    def _refuse_if_too_large(self, rec: ModelRecord, estimate: Estimate) -> None:
        """507 at once, without a load slot or a load, for a model that cannot fit even alone."""
        if estimate.bytes > self.memory_budget_bytes:
            what = "measured once loaded" if estimate.source == "ledger" else f"estimated ({estimate.source})"
            raise self._refuse("model_too_large", InsufficientMemory(
                f"model {rec.model.key!r} needs {estimate.bytes} bytes ({what}), more than the whole memory budget "
                f"of {self.memory_budget_bytes} bytes"))

    async def _admit(self, rec: ModelRecord, estimate: Estimate) -> None:
        """Reserve `estimate` bytes for `rec`, evicting idle models by the policy until it fits both the
        budget and the device; 507 when it can never fit, 503 (retry) when busy models hold the memory."""
        need, budget = estimate.bytes, self.memory_budget_bytes
        self._refuse_if_too_large(rec, estimate)
        deadline = asyncio.get_running_loop().time() + self.config.admission_wait_s
        evicted: list[str] = []
        while True:
            shortfall, limit = self._shortfall(rec, need)
            victims = self._choose_victims(rec, shortfall)
            if victims == []:
                break
            if victims:
                # Reserve only once the victims are gone: used memory, reservations included, never tops the budget.
                await asyncio.gather(*(self._evict(v, reason=limit, chosen=True) for v in victims))
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
        self._update_gauges()
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
    async def _load_slot(self, rec: ModelRecord) -> AsyncIterator[None]:
        """One of `max_concurrent_loads`: parallel loads overshoot estimates together and are a known source
        of out-of-memory in Triton's Python backend (triton-inference-server/server #7094)."""
        async with self._load_slots:
            self._loads_in_flight += 1
            self.metrics.loads_in_flight.set(self._loads_in_flight)
            log.info("model.load_started", extra={"model": rec.model.key, "loads_in_flight": self._loads_in_flight})
            try:
                yield
            finally:
                self._loads_in_flight -= 1
                self.metrics.loads_in_flight.set(self._loads_in_flight)

    async def _load(self, rec: ModelRecord, staged: StagedArtifact) -> None:
        rec.state, rec.etag, rec.artifact_bytes = State.STAGED, staged.etag, staged.artifact_bytes
        rec.model_class, rec.instances = model_class(staged), staged.instance_count
        self._refuse_if_too_large(rec, self._estimate(staged))
        probing = await self._probe_class(staged, rec.model_class)
        try:
            async with self._load_slot(rec):
                await self._admit(rec, self._estimate(staged))
                try:
                    await self._load_with_backstop(rec, staged)
                    await self._settle(rec)
                except BaseException:
                    if rec.state is State.LOADING:
                        rec.state = State.STAGED  # the reservation ends with the load
                    raise
        finally:
            if probing:
                if rec.state is State.LOADING:  # it loaded, measured or not: the class has had its probe
                    self._probed_classes.add(rec.model_class)
                self._first_of_class.release()
        rec.state, rec.error = State.READY, None
        rec.loaded_at, rec.served_since_load, rec.used_since_measured = time.monotonic(), 0, False
        self.policy.record_load(rec.name, rec.footprint_bytes, rec.load_s or 0.0)
        self.staging.touch(rec.name)
        self._update_gauges()
        log.info(
            "model.loaded",
            extra={
                "model": rec.model.key,
                "triton_name": rec.name,
                "etag": rec.etag,
                "download_s": None if rec.download_s is None else round(rec.download_s, 4),
                "load_s": round(rec.load_s or 0.0, 4),
                "footprint_bytes": rec.footprint_bytes,
                "footprint_source": rec.footprint_source,
                "framework": staged.framework,
                "backend": staged.backend,
                "instance_kind": staged.instance_kind,
                "waiters": rec.waiters,
                "committed_bytes": self.committed_bytes(),
            },
        )

    async def _load_with_backstop(self, rec: ModelRecord, staged: StagedArtifact) -> None:
        """Load; on a real out-of-memory failure unload one idle model (policy order) and retry, until it
        loads or nothing idle is left: idle models must never hold the memory while every new load fails,
        which is what happens when the budget is wrong (other processes on the GPU, fragmentation)."""
        deadline = asyncio.get_running_loop().time() + self.config.admission_wait_s
        while True:
            try:
                await self._load_measured(rec, staged)
                return
            except ModelLoadFailed as exc:
                if not _OOM.search(exc.message):
                    raise
                error = exc.message
            victims = self._idle_victims(rec)
            log.warning("model.load_oom", extra={"model": rec.model.key, "error": error,
                                                 "evicting": victims[0].model.key if victims else None})
            if victims:
                victims[0].state = State.UNLOADING
                await self._evict(victims[0], reason="out_of_memory", chosen=True)
                continue
            if self._others_hold_memory(rec) and await self._wait_idle(deadline):
                continue
            if self._others_hold_memory(rec):
                raise self._refuse("memory_busy", MemoryBusy(
                    f"model {rec.model.key!r} ran out of memory loading while the other loaded models kept serving "
                    f"requests; retry shortly ({error})"))
            raise self._refuse("out_of_memory", InsufficientMemory(
                f"model {rec.model.key!r} ran out of memory loading with no other model of this gateway loaded "
                f"(estimate {rec.footprint_bytes} bytes, budget {self.memory_budget_bytes} bytes): {error}"))

    async def _load_measured(self, rec: ModelRecord, staged: StagedArtifact) -> None:
        """Load in Triton and replace the reservation with the measured footprint (state stays LOADING)."""
        # Python-backend models live in their own stub processes and are measured there; other backends
        # load inside Triton, so their footprint is the change around the load, one load at a time.
        in_process = staged.backend != "python"
        async with self._measure_lock if in_process else contextlib.nullcontext():
            before = self.meter.process_wide_bytes() if in_process else None
            started = time.monotonic()
            try:
                await self.control.load(rec.name)
            except ModelLoadFailed as exc:
                self.metrics.loads.labels(result="failed").inc()
                raise ModelLoadFailed(f"model {rec.model.key!r} failed to load in Triton: {exc.message}") from None
            rec.load_s = time.monotonic() - started
            if in_process:
                after = self.meter.process_wide_bytes()
                measured = after - before if after is not None and before is not None else None
            else:
                measured = (await asyncio.to_thread(self.meter.stub_bytes, [rec.name])).get(rec.name)
        if measured and measured > 0:
            self._account_load(rec, measured)
        self.metrics.loads.labels(result="ok").inc()
        self.metrics.loading.observe(rec.load_s)
        self._update_gauges()

    def _account_load(self, rec: ModelRecord, measured: int) -> None:
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
        rec.footprint_bytes, rec.footprint_source = min(accounted, max(measured, self.memory_budget_bytes)), "measured"

    async def _settle(self, rec: ModelRecord) -> None:
        """Enforce the budget on the measured footprint before the model is served: a model that alone
        exceeds it is unloaded and refused (507, remembered through the ledger); otherwise idle models go
        until everything fits again, or, if busy models hold the memory past the wait, this one goes (503)."""
        budget = self.memory_budget_bytes
        if rec.footprint_bytes > budget:  # measured alone over it: accounted growth is capped at the budget
            await self._unload_loading(rec)
            raise self._refuse("model_too_large", InsufficientMemory(
                f"model {rec.model.key!r} measured {rec.footprint_bytes} bytes once loaded, more than the whole "
                f"memory budget of {budget} bytes"))
        deadline = asyncio.get_running_loop().time() + self.config.admission_wait_s
        while (over := self.committed_bytes() - budget) > 0:
            victims = self._choose_victims(rec, over)
            if victims:
                log.info("memory.over_budget_after_load", extra={"model": rec.model.key, "over_bytes": over,
                                                                 "evicting": [v.model.key for v in victims]})
                await asyncio.gather(*(self._evict(v, reason="measured_over_budget", chosen=True) for v in victims))
            elif not await self._wait_idle(deadline):
                await self._unload_loading(rec)
                raise self._refuse("memory_busy", MemoryBusy(
                    f"model {rec.model.key!r} measured {rec.footprint_bytes} bytes once loaded, {over} more than "
                    "the memory budget has left, and the other models kept serving requests; retry shortly"))

    async def _unload_loading(self, rec: ModelRecord) -> None:
        """Take back a load that may not stay (too large, no room); its memory counts until Triton confirms."""
        try:
            await self.control.unload(rec.name)
            await self.control.wait_unloaded(rec.name)
        finally:
            rec.state = State.STAGED
            self._update_gauges()

    # -- keeping the budget while models serve ---------------------------------------------------------------

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
            self._update_gauges()
            await self._enforce_budget("growth")

    async def _enforce_budget(self, reason: str) -> None:
        """Evict idle models until committed memory is within the budget again; a model that alone exceeds
        the whole budget goes first. What busy models hold is taken back on the next pass."""
        budget = self.memory_budget_bytes
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
            await asyncio.gather(*(self._evict(v, reason=reason, chosen=True) for v in victims))

    async def watch_memory(self) -> None:
        """Re-measure loaded models every `remeasure_interval_s` (cheap: one /proc walk, one NVML call), and
        at once after a model's first request since its load."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._measure_soon.wait(), timeout=self.config.remeasure_interval_s)
            self._measure_soon.clear()
            try:
                await self.remeasure()
            except Exception:
                log.exception("memory.remeasure_failed")

    # -- unloading -------------------------------------------------------------------------------------

    async def _evict(self, rec: ModelRecord, reason: str, chosen: bool = False, delete: bool = False) -> bool:
        """Unload an idle model (already marked UNLOADING when `chosen` by admission)."""
        if not chosen:
            if rec.state is not State.READY or rec.leases > 0 or (rec.pipeline and not rec.pipeline.done()):
                return False
            rec.state = State.UNLOADING
        grown = (await asyncio.to_thread(self.meter.stub_bytes, [rec.name])).get(rec.name)
        if grown and rec.etag:  # learn growth since the last pass: the ledger keeps only a larger number
            self.ledger.record(rec.etag, grown, rec.model_class, rec.instances)
        started = time.monotonic()
        try:
            await self.control.unload(rec.name)
            gone = await self.control.wait_unloaded(rec.name)
            if not gone:
                log.warning("model.unload_slow", extra={"model": rec.model.key})
        finally:
            rec.state = State.STAGED
            self.policy.record_evict(rec.name)
            if delete:
                await asyncio.to_thread(self.staging.remove, rec.name)
                rec.state = State.ABSENT
                if rec.pipeline is None or rec.pipeline.done():  # nobody is waiting to load it again
                    self._records.pop(rec.name, None)
            self._update_gauges()
        self.metrics.unloading.observe(time.monotonic() - started)
        self.metrics.evictions.labels(tier="memory", reason=reason).inc()
        log.info("model.unloaded", extra={"model": rec.model.key, "reason": reason,
                                          "unload_s": round(time.monotonic() - started, 4),
                                          "footprint_bytes": rec.footprint_bytes,
                                          "served_since_load": rec.served_since_load,
                                          "resident_s": round(time.monotonic() - rec.loaded_at, 3)})
        return True

    async def unload(self, rec: ModelRecord, reason: str) -> bool:
        """Unload an idle ready model on request (APIs); False if it is leased or not loaded."""
        return await self._evict(rec, reason=reason)

    def _spawn(self, coro: "asyncio.coroutines.Coroutine[object, object, object]") -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)  # keep a reference until done (the loop holds only weak ones)
        task.add_done_callback(self._background.discard)

    # -- models registered by path (the SageMaker multi-model container API) ------------------------------

    async def register(self, name: str, path: Path, wait_timeout_s: float | None = None) -> ModelRecord:
        """Load the model at `path` under `name`; ModelAlreadyExists (409) if that name is registered."""
        if name in self._registered:
            raise ModelAlreadyExists(f"model {name!r} is already loaded")
        model = model_key(name, namespace=f"registered:{path}")
        rec = self._record(model)
        rec.source = PathSource(path)
        self._registered[name] = model.triton_name
        try:
            return await self.ensure_ready(name, wait_timeout_s)
        except ModelNotReady:
            raise  # keeps loading in the background; the registration stands
        except BaseException:
            self._registered.pop(name, None)
            self._records.pop(model.triton_name, None)
            raise

    def registered(self) -> dict[str, ModelRecord]:
        return {name: self._records[t] for name, t in self._registered.items() if t in self._records}

    async def deregister(self, name: str, drain_timeout_s: float = 60.0) -> None:
        """Unload and forget a registered model; ModelNotFound (404) if there is none by that name, ModelBusy
        (409) if its requests do not finish within `drain_timeout_s` (it stays registered then)."""
        triton_name = self._registered.get(name)
        rec = self._records.get(triton_name or "")
        if rec is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while rec.leases > 0 or (rec.pipeline and not rec.pipeline.done()) or rec.state is State.UNLOADING:
            if asyncio.get_running_loop().time() > deadline:
                raise ModelBusy(f"model {name!r} still has requests in flight after {drain_timeout_s:.0f}s")
            await asyncio.sleep(_POLL_S)  # let in-flight requests finish: never cut a request off
        self._registered.pop(name, None)
        if rec.state is State.READY:
            await self._evict(rec, reason="deleted")
        await asyncio.to_thread(self.staging.remove, rec.name)
        self._records.pop(rec.name, None)
        self._update_gauges()

    # -- reconciliation ------------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Align records with Triton's index and the disk: at start and after a Triton restart."""
        index = {entry.name: entry for entry in await self.control.index()}
        on_disk = self.staging.all_staged()
        for artifact in on_disk:
            name = artifact.triton_name
            rec = self._records.get(name)
            if rec is None:
                model = model_key(artifact.key, self.store.url)
                if model.triton_name != name:
                    continue  # registered through the container API before a restart: SageMaker registers again
                rec = self._record(model)
            if rec.pipeline and not rec.pipeline.done():
                continue
            ready = name in index and index[name].state == "READY"
            rec.etag, rec.artifact_bytes = artifact.etag, artifact.artifact_bytes
            rec.checked_at = 0.0  # trust nothing from before: the next call checks the store
            if ready:
                estimate = self._estimate(artifact)
                rec.state, rec.loaded_at = State.READY, time.monotonic()
                rec.model_class, rec.instances = model_class(artifact), artifact.instance_count
                rec.footprint_bytes, rec.footprint_source = estimate.bytes, estimate.source
                self.policy.record_load(name, rec.footprint_bytes, rec.load_s or 1.0)
            else:
                if rec.state is State.READY:
                    self.policy.record_evict(name)
                rec.state = State.STAGED
        staged_names = {a.triton_name for a in on_disk}
        for name, rec in list(self._records.items()):
            if rec.state in (State.READY, State.STAGED) and name not in staged_names and not rec.leases:
                self._records.pop(name)
        self._update_gauges()
        log.info(
            "manager.reconciled",
            extra={"loaded": sum(1 for r in self._records.values() if r.state is State.READY),
                   "staged": len(staged_names), "committed_bytes": self.committed_bytes()},
        )
