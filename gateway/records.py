"""What the gateway knows about each model: its lifecycle state, usage, footprint and load in flight."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import Enum

from gateway.errors import GatewayError, ModelNameCollision
from gateway.naming import ModelKey
from gateway.store.base import ArtifactStore


class State(str, Enum):
    ABSENT = "absent"
    STAGING = "staging"
    STAGED = "staged"
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


log = logging.getLogger(__name__)

RESIDENT = (State.LOADING, State.READY, State.UNLOADING)  # states whose memory counts against the budget


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
    failed_at: float = 0.0  # monotonic time `error` was set by a failed load: retried after the back-off
    sick: bool = False  # its stub hung or died: being killed, unloaded and marked staged (see ModelManager.heal)
    source: ArtifactStore | None = None  # set for models registered by path (container API); else the store
    pipeline: asyncio.Task[None] | None = field(default=None, repr=False)
    inflight: set[asyncio.Task[object]] = field(default_factory=set, repr=False)  # requests waiting on Triton
    healed: set[asyncio.Task[object]] = field(default_factory=set, repr=False)  # of those, cancelled by a heal

    @property
    def name(self) -> str:
        return self.model.triton_name


def name_collision(model: ModelKey, held_by: str, held_in: str, where: str) -> ModelNameCollision:
    """The error for `model` finding its Triton name held by key `held_by` of namespace `held_in` (`where`:
    "record" or "disk"). The log names both; the client's message only its own key (the other may be another
    tenant's)."""
    log.error("model.name_collision", extra={"model": model.key, "namespace": model.namespace,
                                             "triton_name": model.triton_name, "held_by": held_by,
                                             "held_by_namespace": held_in, "where": where})
    return ModelNameCollision(f"model {model.key!r} cannot be served: its internal name is held by another model "
                              "(a gateway fault, refused rather than answering with that model)")


def record_for(rec: ModelRecord | None, model: ModelKey) -> ModelRecord | None:
    """`rec`, found under `model`'s Triton name, if it was made for `model` (None stays None); a record made for
    another model under that name raises ModelNameCollision: records are found by name, and returning it would
    answer one key with another key's model."""
    if rec is None or rec.model is model or rec.model == model:  # `is`: model_key's cache hands out one object
        return rec
    raise name_collision(model, rec.model.key, rec.model.namespace, "record")
