"""The model lifecycle: one owner for every model's state, single-flight loads, leases, reconciliation.

States: absent -> staging -> staged -> loading -> ready -> unloading (-> staged), plus failed (remembered
per ETag so a bad artifact is refused at once until it is replaced in the store).

- Single flight: at most one pipeline per model is in flight (one asyncio Task); every concurrent caller
  awaits that task with its own bound, never a lock shared by all models (Ray Serve's replica-wide lock
  serialised every load, ray #65346). A caller that gives up leaves the pipeline running in the
  background, as SageMaker does, and gets "not ready yet, retry".
- Leases: every request holds a lease on its model for its whole duration; a model with leases is never
  unloaded, so no request ever races an eviction (Seldon retries on 404 instead). Callers waiting on a
  load count as `waiters`, so the load is theirs before anything can evict it.
- Memory: `gateway.budget` decides what fits and what goes (admission, enforcement after measuring,
  growth, the out-of-memory backstop); this module runs the loads and unloads it asks for. An unloading
  model's memory counts as used until Triton's index no longer shows it (modelmesh-serving #455).
- Triton's own index is the ground truth for what is loaded: it is reconciled at start and after Triton
  restarts.
- Records are found by Triton name, and a record (or a staged directory) made for another model under the
  same name is refused with ModelNameCollision: names carry 128 bits of hash, so this is a fault to report,
  never a reason to answer one key with another key's model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from collections.abc import Collection, Coroutine

from gateway.budget import BudgetConfig, MemoryBudget, model_class
from gateway.config import default
from gateway.errors import (
    GatewayError,
    InsufficientMemory,
    InvalidArtifact,
    MemoryBusy,
    ModelAlreadyExists,
    ModelBusy,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    StoreUnavailable,
    TritonUnavailable,
)
from gateway.footprint import Meter
from gateway.ledger import FootprintLedger
from gateway.loading import Loader
from gateway.memory import MemoryProbe
from gateway.metrics import Metrics
from gateway.naming import ModelKey, model_key
from gateway.policy import EvictionPolicy
from gateway.records import RESIDENT, ModelRecord, State, name_collision, record_for
from gateway.staging import StagedArtifact, Staging
from gateway.stubs import Stubs
from gateway.store.base import ArtifactStore, ObjectInfo
from gateway.triton.control import ModelControl

log = logging.getLogger(__name__)

_POLL_S = 0.02
_HEAL_UNLOAD_WAIT_S = 15.0  # a heal waits this long for Triton to confirm the unload: reloading the name while Triton still
# finalizes an instance whose stub is dead can make its Python backend abort (seen once in the soak)
_STALE_RETRY_S = 5.0  # while the store is unreachable, how often a model served from disk is checked again


def _consume_exception(task: asyncio.Task[None]) -> None:
    """A pipeline whose callers all gave up still ends; its error was logged, so do not warn again."""
    if not task.cancelled():
        task.exception()


@dataclass(frozen=True)
class ManagerConfig:
    wait_timeout_s: float = default("wait_timeout_s")  # SageMaker answers within 60 s, loading goes on after
    etag_ttl_s: float = default("etag_ttl_s")  # how long a staged/loaded version is trusted before a store HEAD
    model_cache_enabled: bool = True  # SageMaker's ModelCacheSetting
    load_failure_backoff_s: float = default("load_failure_backoff_s")  # a failed version is retried after it


class ModelManager:
    """Owns model state; adapters call `lease()` and never touch the lifecycle otherwise."""

    def __init__(
        self,
        store: ArtifactStore,
        staging: Staging,
        control: ModelControl,
        metrics: Metrics,
        policy: EvictionPolicy,
        probe: MemoryProbe,
        meter: Meter,
        ledger: FootprintLedger,
        config: ManagerConfig = ManagerConfig(),
        budget: BudgetConfig = BudgetConfig(),
        stubs: Stubs | None = None,
    ) -> None:
        self.store = store
        self.staging = staging
        self.control = control
        self.metrics = metrics
        self.policy = policy
        self.probe = probe
        self.config = config
        self._records: dict[str, ModelRecord] = {}
        self.budget = MemoryBudget(self._records, policy, probe, meter, ledger, metrics, budget,
                                   evict=lambda rec, reason: self._evict(rec, reason, chosen=True),
                                   changed=self._update_gauges,
                                   stub_missing=lambda rec: self.heal(rec, "stub_died"))
        self.loader = Loader(control, meter, self.budget, metrics, policy, staging, changed=self._update_gauges,
                             stubs=stubs)
        self._registered: dict[str, ModelKey] = {}  # container-API model name -> its model
        self.triton_up = True  # False while the embedded Triton is down or restarting (see `suspend`)
        self._hit = metrics.cache_requests.labels(result="hit")  # labels() costs microseconds per request
        self._miss = metrics.cache_requests.labels(result="miss")
        self._background: set[asyncio.Task[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None  # see `loop`
        self.leased = 0  # leases held now: mme_requests_in_flight, read when scraped (no lock per request)
        metrics.in_flight.set_function(lambda: self.leased)
        if staging.budget_bytes is not None:
            metrics.disk_budget.set(staging.budget_bytes)

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def memory_budget_bytes(self) -> int:
        return self.budget.budget_bytes

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def record(self, key: str) -> ModelRecord | None:
        return self._find(self._resolve(key))

    def _find(self, model: ModelKey) -> ModelRecord | None:
        """`model`'s record, or None; ModelNameCollision if its name holds another model's (see `record_for`)."""
        return record_for(self._records.get(model.triton_name), model)

    def committed_bytes(self) -> int:
        """Memory of models loaded, loading or not yet confirmed unloaded."""
        return self.budget.committed_bytes()

    def _resolve(self, key: str | ModelKey) -> ModelKey:
        """A store key's model; a ModelKey (a registered model's, from `registered_model`) as it is. Registered
        names live apart: they never change what a store key answers on any route."""
        return key if isinstance(key, ModelKey) else model_key(key, self.store.url)

    def _source(self, rec: ModelRecord) -> ArtifactStore:
        return rec.source or self.store

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the gateway serves on, looked up once per loop: on Python 3.11 each
        asyncio.get_running_loop() is a getpid() system call, several microseconds on the request path."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _record(self, model: ModelKey) -> ModelRecord:
        rec = self._records.get(model.triton_name)
        if rec is not None and rec.model is not model:  # on every request: the check only when not the same object
            record_for(rec, model)
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

    def lease(self, key: str | ModelKey, wait_timeout_s: float | None = None) -> Lease:
        """Make `key` ready (staging and loading it if needed) and hold it loaded while the block runs."""
        return Lease(self, key, self.config.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)

    def _release(self, rec: ModelRecord) -> None:
        """The end of a lease: the model may be evicted once no lease holds it."""
        rec.leases -= 1
        rec.last_used = time.monotonic()
        self.leased -= 1
        if rec.leases == 0:
            self.budget.model_idle()
        if not rec.used_since_measured:  # a first request grows a model most (arenas, lazy imports)
            rec.used_since_measured = True
            self.budget.first_use()
        if not self.config.model_cache_enabled and rec.leases == 0 and rec.source is None:
            self._spawn(self._evict(rec, reason="cache_disabled", delete=True))

    async def ensure_ready(self, key: str | ModelKey, wait_timeout_s: float | None = None) -> ModelRecord:
        """Load `key` without holding it (metadata calls, explicit loads)."""
        model = self._resolve(key)
        rec = await self._acquire(model, self.config.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)
        rec.leases -= 1
        rec.last_used = time.monotonic()
        return rec

    async def _acquire(self, model: ModelKey, wait_timeout_s: float) -> ModelRecord:
        # time.monotonic, not the loop's clock: on Python 3.11 asyncio.get_running_loop() is a getpid() system
        # call, and this runs on every request
        started = time.monotonic()
        deadline = started + wait_timeout_s
        rec = self._record(model)
        hit = rec.state is State.READY  # SageMaker's ModelCacheHit: loaded when the invocation arrived
        confirmed = False  # a pipeline this caller awaited has just checked the store
        while True:
            if rec.state is State.READY:
                if not confirmed and self._stale(rec):
                    self._refresh(rec)  # the store is asked in the background: never on the request path
                rec.leases += 1  # no await between the check and the increment: eviction cannot slip in
                rec.served_since_load += 1
                (self._hit if hit else self._miss).inc()
                if hit:
                    rec.hits += 1
                    self.policy.record_hit(rec.name)
                else:
                    rec.misses += 1
                    self.metrics.loading_wait.observe(time.monotonic() - started)
                return rec
            if not self.triton_up:  # no load can succeed now; say "retry" at once instead of queueing loads
                raise TritonUnavailable(f"model {model.key!r} cannot be loaded while Triton restarts; retry shortly")
            task = rec.pipeline
            if task is None or task.done():
                task = rec.pipeline = asyncio.create_task(self._pipeline(rec), name=f"pipeline:{model.triton_name}")
                task.add_done_callback(_consume_exception)
            remaining = deadline - time.monotonic()
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

    def _refresh(self, rec: ModelRecord) -> None:
        """Check a loaded model's version against the store in the background (one check at a time); a new
        version is staged and loaded in its place, a deleted object unloads it."""
        if rec.pipeline is None or rec.pipeline.done():
            rec.pipeline = asyncio.create_task(self._pipeline(rec), name=f"refresh:{rec.name}")
            rec.pipeline.add_done_callback(_consume_exception)

    async def _head(self, rec: ModelRecord, staged: StagedArtifact | None) -> ObjectInfo:
        """The store's word on the model's version; when the store cannot be reached and a copy is on disk,
        that copy (stale-if-error: a store outage must not take down models the gateway already has),
        checked again after `_STALE_RETRY_S`."""
        try:
            info = await asyncio.to_thread(self._source(rec).head, rec.model.key)
        except StoreUnavailable as exc:
            if staged is None or rec.state is State.FAILED:
                raise
            retry_s = min(_STALE_RETRY_S, self.config.etag_ttl_s)
            rec.checked_at = time.monotonic() - self.config.etag_ttl_s + retry_s
            self.metrics.stale_served.inc()
            log.warning("store.unreachable_serving_staged",
                        extra={"model": rec.model.key, "etag": staged.etag, "retry_s": retry_s, "error": exc.message})
            return ObjectInfo(key=rec.model.key, etag=staged.etag, size=staged.artifact_bytes)
        rec.checked_at = time.monotonic()
        return info

    # -- the load pipeline (one per model in flight) ----------------------------------------------------

    async def _pipeline(self, rec: ModelRecord) -> None:
        try:
            await self._run_pipeline(rec)
        except ModelNotFound:
            if rec.state not in RESIDENT and rec.source is None:
                self._records.pop(rec.name, None)
            elif rec.state is State.READY and rec.source is None:  # deleted from the store: stop serving it
                log.info("model.deleted_from_store", extra={"model": rec.model.key})
                self._spawn(self._evict(rec, reason="deleted_from_store", delete=True))
            raise
        except (InvalidArtifact, ModelLoadFailed, InsufficientMemory, MemoryBusy) as exc:
            if rec.state is State.LOADING or rec.state is State.STAGED:
                # No room is not a broken artifact: a 507 is refused again from the ledger's measurement
                rec.state = State.STAGED if isinstance(exc, (InsufficientMemory, MemoryBusy)) else State.FAILED
            elif rec.state is State.STAGING:
                rec.state = State.FAILED
            rec.error, rec.failed_at = exc, time.monotonic()
            self.metrics.load_failures.labels(reason=exc.code).inc()
            log.warning("model.failed", extra={"model": rec.model.key, "etag": rec.etag, "error": exc.message})
            raise
        except BaseException as exc:  # store or Triton unreachable, cancelled: nothing is cached, retry later
            if rec.state is State.STAGING:
                rec.state = State.STAGED if self.staging.staged(rec.name) else State.ABSENT
            if rec.state is State.ABSENT and rec.source is None and not rec.leases:
                self._records.pop(rec.name, None)  # nothing learned: a key that never staged leaves no record
            if isinstance(exc, GatewayError):
                self.metrics.load_failures.labels(reason=exc.code).inc()
            raise
        finally:
            self._update_gauges()

    async def _run_pipeline(self, rec: ModelRecord) -> None:
        while rec.state is State.UNLOADING:  # an eviction chose it just before this request: let it finish
            await asyncio.sleep(_POLL_S)
        staged = self._staged(rec)
        if staged is not None and staged.etag == rec.etag and not self._stale(rec) and rec.state is not State.FAILED:
            info = ObjectInfo(key=rec.model.key, etag=staged.etag, size=staged.artifact_bytes)  # trusted (TTL)
        else:
            info = await self._head(rec, staged)
        if rec.state is State.FAILED and rec.etag == info.etag and rec.error is not None and (
                time.monotonic() - rec.failed_at < self.config.load_failure_backoff_s):
            raise rec.error  # same bytes as the last failure: refuse at once until the back-off has passed
        if rec.state is State.READY and rec.etag == info.etag:
            return
        if staged is None or staged.etag != info.etag:
            staged = await self._stage(rec, info)
        else:
            self.metrics.disk_hits.inc()
            log.info("model.disk_hit", extra={"model": rec.model.key, "etag": info.etag})
        await self.loader.load(rec, staged)

    def _staged(self, rec: ModelRecord) -> StagedArtifact | None:
        """What is on disk under the model's name; ModelNameCollision if that was staged for another model."""
        staged = self.staging.staged(rec.name)
        if staged is not None and (staged.key, staged.namespace) != (rec.model.key, rec.model.namespace):
            raise name_collision(rec.model, staged.key, staged.namespace, "disk")
        return staged

    async def _stage(self, rec: ModelRecord, info: ObjectInfo) -> StagedArtifact:
        rec.state, rec.etag, rec.error = State.STAGING, info.etag, None
        log.info("model.staging", extra={"model": rec.model.key, "etag": info.etag, "bytes": info.size})
        await self._make_disk_room(info.size, keep=rec.name)  # the archive; its extraction: from its headers
        staged = await asyncio.to_thread(self.staging.stage, rec.model, info, self._source(rec),
                                         self._disk_protected(rec.name))
        rec.state, rec.artifact_bytes, rec.download_s = State.STAGED, staged.artifact_bytes, staged.download_s
        self.metrics.downloads.inc()
        self.metrics.download_bytes.inc(staged.artifact_bytes)
        self.metrics.downloading.observe(staged.download_s)
        await self._make_disk_room(0, keep=rec.name)
        return staged

    def _disk_protected(self, keep: str) -> set[str]:
        """Staged models whose files must stay: loaded, loading or in use, and `keep`."""
        return {r.name for r in self._records.values() if r.state is not State.STAGED or r.leases} | {keep}

    async def _make_disk_room(self, need_bytes: int, keep: str) -> None:
        protected = self._disk_protected(keep)
        for name in await asyncio.to_thread(self.staging.make_room, need_bytes, protected):
            self.metrics.evictions.labels(tier="disk", reason="disk_budget").inc()
            log.info("model.evicted_from_disk", extra={"triton_name": name})
        self._update_gauges()

    # -- admission and loading ------------------------------------------------------------------------------

    # -- unloading -------------------------------------------------------------------------------------

    async def _evict(self, rec: ModelRecord, reason: str, chosen: bool = False, delete: bool = False) -> bool:
        """Unload an idle model (already marked UNLOADING when `chosen` by admission)."""
        if not chosen:
            if rec.state is not State.READY or rec.leases > 0 or (rec.pipeline and not rec.pipeline.done()):
                return False
            rec.state = State.UNLOADING
        started = time.monotonic()
        try:
            if not await self.loader.unload(rec):
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

    def heal(self, rec: ModelRecord, reason: str) -> None:
        """The model's stub hung or died while serving: end the requests waiting on it (503, retry), kill its
        stubs, unload it and leave it staged, so the next request loads a fresh one."""
        if rec.sick or rec.state is not State.READY or not self.triton_up:
            return
        rec.sick = True
        for task in list(rec.inflight):
            rec.healed.add(task)
            task.cancel()
        self.metrics.unhealthy_models.labels(reason=reason).inc()
        log.warning("model.unhealthy", extra={"model": rec.model.key, "reason": reason, "in_flight": len(rec.healed)})
        self._spawn(self._heal(rec))

    async def _heal(self, rec: ModelRecord) -> None:
        rec.state = State.UNLOADING
        try:
            await self.loader.force_unload(rec, _HEAL_UNLOAD_WAIT_S)
        finally:
            rec.state = State.STAGED if self.staging.staged(rec.name) else State.ABSENT
            rec.sick = False
            self.policy.record_evict(rec.name)
            self._update_gauges()
            log.info("model.healed", extra={"model": rec.model.key})

    def suspend(self) -> None:
        """Triton is down: every model it held is lost, and loads wait until `resume`."""
        self.triton_up = False
        self.lost()

    def resume(self) -> None:
        self.triton_up = True

    def lost(self, recs: Collection[ModelRecord] | None = None) -> int:
        """Triton no longer has these models (it died, restarted, or answered "unknown model"): they are
        staged, not loaded, so the next request loads them again instead of being told they do not exist.
        All models when `recs` is None. Returns how many were marked."""
        marked = 0
        for rec in list(self._records.values()) if recs is None else recs:
            if rec.state in (State.READY, State.UNLOADING):
                rec.state = State.STAGED if self.staging.staged(rec.name) else State.ABSENT
                self.policy.record_evict(rec.name)
                marked += 1
        if marked:
            log.warning("models.lost_by_triton", extra={"models": marked})
            self._update_gauges()
        return marked

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference until done (the loop holds only weak ones)
        task.add_done_callback(self._background.discard)

    # -- models registered by path (the SageMaker multi-model container API) ------------------------------

    async def register(self, name: str, source: ArtifactStore, wait_timeout_s: float | None = None) -> ModelRecord:
        """Load the one model `source` holds under `name`; ModelAlreadyExists (409) if that name is registered
        or is a model in the store (a registered name must not look like it answers for a store key)."""
        if name in self._registered:
            raise ModelAlreadyExists(f"model {name!r} is already loaded")
        model = model_key(name, namespace=f"registered:{source.url}")
        try:
            await asyncio.to_thread(self.store.head, name)
        except ModelNotFound:
            pass
        else:
            raise ModelAlreadyExists(f"model name {name!r} is a model in the store; register it under another name")
        rec = self._record(model)
        rec.source = source
        self._registered[name] = model
        try:
            return await self.ensure_ready(model, wait_timeout_s)
        except ModelNotReady:
            raise  # keeps loading in the background; the registration stands
        except BaseException:
            self._registered.pop(name, None)
            self._records.pop(model.triton_name, None)
            raise

    def registered_model(self, name: str) -> ModelKey | None:
        """The model registered as `name` (the container API's invoke leases it by this), or None."""
        model = self._registered.get(name)
        return None if model is None or self._find(model) is None else model

    def registered(self) -> dict[str, ModelRecord]:
        return {name: rec for name, model in self._registered.items() if (rec := self._find(model)) is not None}

    async def deregister(self, name: str, drain_timeout_s: float = 60.0) -> None:
        """Unload and forget a registered model; ModelNotFound (404) if there is none by that name, ModelBusy
        (409) if its requests do not finish within `drain_timeout_s` (it stays registered then)."""
        model = self._registered.get(name)
        rec = None if model is None else self._find(model)
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
        """Align records with Triton's index and the disk: at start and after a Triton restart. A model Triton
        has loaded that no record answers for (an external Triton that outlived the gateway: registered
        through the container API, or staged under an older naming) is unloaded: no key may reach it, and
        its memory would be invisible to the budget."""
        index = {entry.name: entry for entry in await self.control.index()}
        on_disk = self.staging.all_staged()
        for artifact in on_disk:
            name = artifact.triton_name
            rec = self._records.get(name)
            if rec is None:
                model = model_key(artifact.key, artifact.namespace)
                if artifact.namespace != self.store.url or model.triton_name != name:
                    continue  # registered through the container API before a restart: SageMaker registers again
                rec = self._record(model)
            elif (rec.model.key, rec.model.namespace) != (artifact.key, artifact.namespace):
                continue  # staged for another model under this name: `_staged` refuses it if this one loads
            if rec.pipeline and not rec.pipeline.done():
                continue
            ready = name in index and index[name].state == "READY"
            rec.etag, rec.artifact_bytes = artifact.etag, artifact.artifact_bytes
            rec.checked_at = 0.0  # trust nothing from before: the next call checks the store
            if ready:
                estimate = self.budget.estimate(artifact)
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
        for name, entry in index.items():
            if entry.state == "READY" and name not in self._records:
                log.warning("model.unknown_unloaded", extra={"triton_name": name})
                try:
                    await self.control.unload(name)
                except Exception as exc:  # advisory: a start must not fail on it (the next reconcile tries again)
                    log.warning("model.unknown_unload_failed", extra={"triton_name": name, "error": str(exc)})
        self._update_gauges()
        log.info(
            "manager.reconciled",
            extra={"loaded": sum(1 for r in self._records.values() if r.state is State.READY),
                   "staged": len(staged_names), "committed_bytes": self.committed_bytes()},
        )


class Lease:
    """`ModelManager.lease`: an async context manager written as a class, because it is on every request's
    path, where a generator-based one costs a few microseconds more each way."""

    __slots__ = ("manager", "key", "wait_timeout_s", "rec")

    def __init__(self, manager: ModelManager, key: str | ModelKey, wait_timeout_s: float) -> None:
        self.manager, self.key, self.wait_timeout_s = manager, key, wait_timeout_s
        self.rec: ModelRecord | None = None

    async def __aenter__(self) -> ModelRecord:
        manager = self.manager
        rec = self.rec = await manager._acquire(manager._resolve(self.key), self.wait_timeout_s)
        manager.leased += 1
        return rec

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.rec is not None
        self.manager._release(self.rec)
