"""The model lifecycle: one owner for every model's state, single-flight loads, and leases.

States: absent -> staging -> staged -> loading -> ready -> unloading (-> staged), plus failed (remembered
per ETag so a bad artifact is refused at once until it is replaced in the store).

- Single flight: at most one pipeline per model is in flight (one asyncio Task); every concurrent caller
  awaits that task with its own bound, never a lock shared by all models (Ray Serve's replica-wide lock
  serialised every load, ray #65346). A caller that gives up leaves the pipeline running in the
  background, as SageMaker does, and gets "not ready yet, retry".
- Leases: every request holds a lease on its model for its whole duration; a model with leases is never
  unloaded, so no request ever races an eviction (Seldon retries on 404 instead).
- Triton's own index is the ground truth for what is loaded: it is reconciled at start and after Triton
  restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import AsyncIterator

from pathlib import Path

from gateway.errors import (
    GatewayError,
    InvalidArtifact,
    ModelAlreadyExists,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
)
from gateway.metrics import Metrics
from gateway.naming import ModelKey, model_key
from gateway.staging import StagedArtifact, StagingArea
from gateway.store.base import ArtifactStore, ObjectInfo
from gateway.store.path import PathSource
from gateway.triton.control import TritonControl

log = logging.getLogger(__name__)


class State(str, Enum):
    ABSENT = "absent"
    STAGING = "staging"
    STAGED = "staged"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass
class ModelRecord:
    """Everything the gateway knows about one model."""

    model: ModelKey
    state: State = State.ABSENT
    etag: str | None = None
    artifact_bytes: int = 0
    leases: int = 0
    hits: int = 0
    misses: int = 0
    last_used: float = 0.0
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
    etag_ttl_s: float = 30.0  # how long a loaded version is trusted before the store is asked again


class ModelManager:
    """Owns model state; adapters call `lease()` and never touch the lifecycle otherwise."""

    def __init__(
        self,
        store: ArtifactStore,
        staging: StagingArea,
        control: TritonControl,
        metrics: Metrics,
        config: ManagerConfig = ManagerConfig(),
    ) -> None:
        self.store = store
        self.staging = staging
        self.control = control
        self.metrics = metrics
        self.config = config
        self._records: dict[str, ModelRecord] = {}
        self._registered: dict[str, str] = {}  # container-API model name -> Triton name

    # -- queries ---------------------------------------------------------------------------------------

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def record(self, key: str) -> ModelRecord | None:
        return self._records.get(self._resolve(key).triton_name)

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

    def _set_loaded_gauge(self) -> None:
        self.metrics.loaded_models.set(sum(1 for r in self._records.values() if r.state is State.READY))

    # -- the request path --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(self, key: str, wait_timeout_s: float | None = None) -> AsyncIterator[ModelRecord]:
        """Make `key` ready (staging and loading it if needed) and hold it loaded while the block runs."""
        model = self._resolve(key)
        rec = await self._acquire(model, self.config.wait_timeout_s if wait_timeout_s is None else wait_timeout_s)
        self.metrics.in_flight.inc()
        try:
            yield rec
        finally:
            rec.leases -= 1
            rec.last_used = time.monotonic()
            self.metrics.in_flight.dec()

    async def ensure_ready(self, key: str, wait_timeout_s: float | None = None) -> ModelRecord:
        """Load `key` without holding it (metadata calls, explicit loads)."""
        async with self.lease(key, wait_timeout_s) as rec:
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
                self.metrics.cache_requests.labels(result="hit" if hit else "miss").inc()
                if hit:
                    rec.hits += 1
                else:
                    rec.misses += 1
                    self.metrics.loading_wait.observe(loop.time() - started)
                return rec
            task = rec.pipeline
            if task is None or task.done():
                task = rec.pipeline = asyncio.create_task(self._pipeline(rec), name=f"pipeline:{model.triton_name}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ModelNotReady(f"model {model.key!r} is still loading; retry shortly")
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=remaining)
            except asyncio.TimeoutError:
                raise ModelNotReady(
                    f"model {model.key!r} is not ready after {wait_timeout_s:.0f}s (state {rec.state.value}); "
                    "it keeps loading in the background, retry shortly"
                ) from None
            confirmed = True

    def _stale(self, rec: ModelRecord) -> bool:
        return time.monotonic() - rec.checked_at > self.config.etag_ttl_s

    # -- the load pipeline (one per model in flight) ----------------------------------------------------

    async def _pipeline(self, rec: ModelRecord) -> None:
        try:
            await self._run_pipeline(rec)
        except ModelNotFound:
            if rec.state is not State.READY:
                self._records.pop(rec.name, None)
            raise
        except (InvalidArtifact, ModelLoadFailed) as exc:
            rec.state, rec.error = State.FAILED, exc
            self.metrics.load_failures.labels(reason=exc.code).inc()
            log.warning("model.failed", extra={"model": rec.model.key, "etag": rec.etag, "error": exc.message})
            raise
        finally:
            self._set_loaded_gauge()

    async def _run_pipeline(self, rec: ModelRecord) -> None:
        info: ObjectInfo = await asyncio.to_thread(self._source(rec).head, rec.model.key)
        if rec.state is State.FAILED and rec.etag == info.etag and rec.error is not None:
            raise rec.error  # same bytes as the last failure: refuse at once instead of downloading again
        if rec.state is State.READY and rec.etag == info.etag:
            rec.checked_at = time.monotonic()
            return
        staged = self.staging.staged(rec.name)
        if staged is None or staged.etag != info.etag:
            staged = await self._stage(rec, info)
        else:
            self.metrics.disk_hits.inc()
        await self._load(rec, staged)

    async def _stage(self, rec: ModelRecord, info: ObjectInfo) -> StagedArtifact:
        rec.state, rec.etag, rec.error = State.STAGING, info.etag, None
        log.info("model.staging", extra={"model": rec.model.key, "etag": info.etag, "bytes": info.size})
        staged = await asyncio.to_thread(self.staging.stage, rec.model, info, self._source(rec))
        rec.state, rec.artifact_bytes, rec.download_s = State.STAGED, staged.artifact_bytes, staged.download_s
        self.metrics.downloads.inc()
        self.metrics.download_bytes.inc(staged.artifact_bytes)
        self.metrics.downloading.observe(staged.download_s)
        return staged

    async def _load(self, rec: ModelRecord, staged: StagedArtifact) -> None:
        rec.state, rec.etag, rec.artifact_bytes = State.LOADING, staged.etag, staged.artifact_bytes
        started = time.monotonic()
        try:
            await self.control.load(rec.name)
        except ModelLoadFailed as exc:
            self.metrics.loads.labels(result="failed").inc()
            raise ModelLoadFailed(f"model {rec.model.key!r} failed to load in Triton: {exc.message}") from None
        except BaseException:
            rec.state = State.STAGED
            raise
        rec.load_s = time.monotonic() - started
        rec.state, rec.checked_at, rec.error = State.READY, time.monotonic(), None
        self.metrics.loads.labels(result="ok").inc()
        self.metrics.loading.observe(rec.load_s)
        log.info(
            "model.loaded",
            extra={
                "model": rec.model.key,
                "triton_name": rec.name,
                "etag": rec.etag,
                "download_s": None if rec.download_s is None else round(rec.download_s, 4),
                "load_s": round(rec.load_s, 4),
                "framework": staged.framework,
                "backend": staged.backend,
            },
        )

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

    async def deregister(self, name: str) -> None:
        """Unload and forget a registered model; ModelNotFound (404) if there is none by that name."""
        triton_name = self._registered.get(name)
        rec = self._records.get(triton_name or "")
        if rec is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        while rec.leases > 0 or (rec.pipeline and not rec.pipeline.done()):
            await asyncio.sleep(0.01)  # let in-flight requests finish: never cut a request off
        self._registered.pop(name, None)
        await self.unload(rec, reason="deleted")
        self.staging.remove(rec.name)
        self._records.pop(rec.name, None)

    # -- unloading and reconciliation ----------------------------------------------------------------------

    async def unload(self, rec: ModelRecord, reason: str) -> bool:
        """Unload an idle ready model; False if it is leased or not loaded. Memory counts as free only once
        Triton's index no longer shows the model (modelmesh-serving #455)."""
        if rec.state is not State.READY or rec.leases > 0:
            return False
        rec.state = State.UNLOADING
        started = time.monotonic()
        try:
            await self.control.unload(rec.name)
            await self.control.wait_unloaded(rec.name)
        finally:
            rec.state = State.STAGED
            self._set_loaded_gauge()
        self.metrics.unloading.observe(time.monotonic() - started)
        self.metrics.evictions.labels(tier="memory", reason=reason).inc()
        log.info("model.unloaded", extra={"model": rec.model.key, "reason": reason})
        return True

    async def reconcile(self) -> None:
        """Align records with Triton's index: at start and after a Triton restart."""
        index = {entry.name: entry for entry in await self.control.index()}
        staged = {a.triton_name: a for a in self.staging.all_staged()}
        for name, artifact in staged.items():
            rec = self._records.get(name) or self._record(model_key(artifact.key, self.store.url))
            if rec.pipeline and not rec.pipeline.done():
                continue
            ready = index.get(name) is not None and index[name].state == "READY"
            rec.etag, rec.artifact_bytes = artifact.etag, artifact.artifact_bytes
            rec.state = State.READY if ready else State.STAGED
            rec.checked_at = 0.0  # trust nothing from before: the next call checks the store
        for name, rec in list(self._records.items()):
            if name not in staged and rec.state in (State.READY, State.STAGED) and not rec.leases:
                self._records.pop(name)
        self._set_loaded_gauge()
        log.info(
            "manager.reconciled",
            extra={"loaded": sum(1 for r in self._records.values() if r.state is State.READY), "staged": len(staged)},
        )
