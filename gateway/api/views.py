"""How the SageMaker container API describes a model: its listing and `GET /models/{name}`."""

from __future__ import annotations

import time
from typing import Any

from gateway.records import ModelRecord
from gateway.redact import public


def describe(rec: ModelRecord, now: float | None = None) -> dict[str, Any]:
    """A JSON-ready summary of one model: identity, state, usage and timings."""
    now = time.monotonic() if now is None else now
    return {
        "modelName": rec.model.key,
        "state": rec.state.value,
        "etag": rec.etag,
        "artifactBytes": rec.artifact_bytes,
        "footprintBytes": rec.footprint_bytes or None,
        "footprintSource": rec.footprint_source,
        "leases": rec.leases,
        "hits": rec.hits,
        "misses": rec.misses,
        "idleSeconds": round(now - rec.last_used, 3) if rec.last_used else None,
        "downloadSeconds": rec.download_s,
        "loadSeconds": rec.load_s,
        "error": public(rec.error.message) if rec.error else None,
    }
