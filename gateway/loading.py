"""The Triton side of the lifecycle: load a staged model under the memory budget, measured, and unload it.

A load reserves its estimate (`gateway.budget`), asks Triton to load, retries after an out-of-memory failure
once the budget has freed an idle model, measures what the model really holds, and settles the budget on
that measurement before the model is served. Python-backend models are measured in their own stub
processes; other backends load inside tritonserver, so their footprint is the change around the load,
one such load at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.budget import MemoryBudget, is_out_of_memory, model_class
from gateway.errors import LoadTimedOut, ModelLoadFailed
from gateway.footprint import Meter
from gateway.metrics import Metrics
from gateway.policy import EvictionPolicy
from gateway.records import ModelRecord, State
from gateway.staging import StagedArtifact, Staging
from gateway.stubs import Stubs
from gateway.triton.control import ModelControl

log = logging.getLogger(__name__)


class Loader:
    """Loads and unloads one model at a time in Triton; the manager decides which and when."""

    def __init__(self, control: ModelControl, meter: Meter, budget: MemoryBudget, metrics: Metrics,
                 policy: EvictionPolicy, staging: Staging, changed: Callable[[], None],
                 stubs: Stubs | None = None) -> None:
        self.stubs = stubs
        self.wedged = 0  # loads past --load-timeout still being stopped: load capacity that is not there
        self.control = control
        self.meter = meter
        self.budget = budget
        self.metrics = metrics
        self.policy = policy
        self.staging = staging
        self._changed = changed  # gauges to update
        self._measure_lock = asyncio.Lock()  # device-wide deltas are only meaningful one load at a time

    async def load(self, rec: ModelRecord, staged: StagedArtifact) -> None:
        """Reserve, load with the out-of-memory backstop, measure, settle the budget, then READY."""
        rec.state, rec.etag, rec.artifact_bytes = State.STAGED, staged.etag, staged.artifact_bytes
        rec.model_class, rec.instances = model_class(staged), staged.instance_count
        self.budget.refuse_if_too_large(rec, self.budget.estimate(staged))
        async with self.budget.load_turn(rec, staged):  # `rec` holds its reservation from here
            try:
                await self._load_with_backstop(rec, staged)
                await self.budget.settle(rec, self.take_back)
            except BaseException:
                if rec.state is State.LOADING:
                    rec.state = State.STAGED  # the reservation ends with the load
                raise
        rec.state, rec.error = State.READY, None
        rec.loaded_at, rec.served_since_load, rec.used_since_measured = time.monotonic(), 0, False
        self.policy.record_load(rec.name, rec.footprint_bytes, rec.load_s or 0.0)
        self.staging.touch(rec.name)
        self._changed()
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
                "committed_bytes": self.budget.committed_bytes(),
            },
        )

    async def _load_with_backstop(self, rec: ModelRecord, staged: StagedArtifact) -> None:
        """Load; on a real out-of-memory failure unload one idle model (policy order) and retry, until it
        loads or nothing idle is left: idle models must never hold the memory while every new load fails,
        which is what happens when the budget is wrong (other processes on the GPU, fragmentation)."""
        deadline = self.budget.deadline()
        while True:
            try:
                await self._load_measured(rec, staged)
                return
            except ModelLoadFailed as exc:
                if not is_out_of_memory(exc.message):
                    raise
                await self.budget.after_out_of_memory(rec, exc.message, deadline)

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
            except LoadTimedOut:
                self.metrics.loads.labels(result="timed_out").inc()
                await self._stop_wedged(rec)
                raise LoadTimedOut(f"model {rec.model.key!r} did not finish loading within the load timeout "
                                   "(--load-timeout): its load was stopped; the same version is tried again after "
                                   "--load-failure-backoff, a new one at once") from None
            except ModelLoadFailed as exc:
                self.metrics.loads.labels(result="failed").inc()
                reason = exc.message.replace(rec.name, rec.model.key)  # clients never see internal names
                raise ModelLoadFailed(f"model {rec.model.key!r} failed to load in Triton: {reason}") from None
            rec.load_s = time.monotonic() - started
            if in_process:
                after = self.meter.process_wide_bytes()
                measured = after - before if after is not None and before is not None else None
            else:
                measured = (await asyncio.to_thread(self.meter.stub_bytes, [rec.name])).get(rec.name)
        if measured and measured > 0:
            self.budget.account_load(rec, measured)
        self.metrics.loads.labels(result="ok").inc()
        self.metrics.loading.observe(rec.load_s)
        self._changed()

    async def _stop_wedged(self, rec: ModelRecord) -> None:
        """A load that outlived --load-timeout: kill its stubs (a hung `initialize` never returns by itself),
        then have Triton drop it, so the load slot and the name are free again."""
        self.wedged += 1
        try:
            await self.force_unload(rec)
            log.warning("model.load_stopped", extra={"model": rec.model.key})
        finally:
            self.wedged -= 1

    async def force_unload(self, rec: ModelRecord, wait_s: float = 30.0) -> None:
        """Kill the model's stubs, then have Triton drop it and wait up to `wait_s` for the confirmation: for a
        model whose stub hangs or died, which a plain unload may never finish (Triton waits for the requests
        queued to the stub). Failures are swallowed: the caller decides the model's state."""
        if self.stubs is not None:
            await asyncio.to_thread(self.stubs.kill, rec.name)
        with contextlib.suppress(Exception):
            await self.control.unload(rec.name)
            await self.control.wait_unloaded(rec.name, timeout_s=wait_s)

    async def take_back(self, rec: ModelRecord) -> None:
        """Take back a load that may not stay (too large, no room); its memory counts until Triton confirms."""
        try:
            await self.control.unload(rec.name)
            await self.control.wait_unloaded(rec.name)
        finally:
            rec.state = State.STAGED
            self._changed()

    async def unload(self, rec: ModelRecord) -> bool:
        """Unload `rec` (marked UNLOADING by the caller) and wait until Triton's index confirms; False when
        the confirmation did not come in time. What it held last is news for the ledger."""
        self.budget.learn_before_unload(rec, (await asyncio.to_thread(self.meter.stub_bytes, [rec.name])).get(rec.name))
        await self.control.unload(rec.name)
        return await self.control.wait_unloaded(rec.name)
