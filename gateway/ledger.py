"""The footprint ledger: measured model memory per artifact version, and estimates learned from it.

Admission needs a number before a load, and only a measurement after the load is true. The ledger keeps
the largest footprint measured for each artifact version (keyed by ETag: a new upload of the same key is
a different artifact), persisted as JSON so estimates survive restarts. For an artifact never measured,
a fixed guess is wrong by orders of magnitude (96 MiB was 5x low for a GPU stub and 2,000x low for a
ballast model), so the ledger also learns per model class (backend, framework, instance kind): the
estimate is a high percentile of what this gateway has measured for that class, per instance, never
below the size-times-factor fallback. The first model of a class may still be off; the second is not.

Models also grow once they serve (onnxruntime sizes its arena on the first requests), so each entry keeps
the footprint measured right after the load beside the largest one seen in use; their ratio, learned per
class, tells how much a model just loaded will grow before it has served anything.

The ledger is advisory: a corrupt file or a failed write is logged and never stops the gateway.

File format: {"version": 2, "footprints": {"<etag>": {"bytes": N, "loaded": M, "class":
"python/onnx/KIND_CPU", "instances": 1}, ...}}; version 1 files ({"<etag>": N}) are read as measurements
of no known class.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_VERSION = 2
LEARNED_PERCENTILE = 0.9  # a high percentile, not the mean: under-estimating is what breaks a budget
MAX_LEARNED_GROWTH = 2.0  # a class of leaking models must not make every new load look twice as large


@dataclass(frozen=True)
class Footprint:
    """One artifact version's largest measured footprint, for all its instances, and the first one
    measured right after a load (before it served anything)."""

    bytes: int
    model_class: str | None = None
    instances: int = 1
    loaded: int | None = None

    @property
    def per_instance(self) -> int:
        return self.bytes // max(self.instances, 1)

    @property
    def growth(self) -> float | None:
        return self.bytes / self.loaded if self.loaded else None


@dataclass(frozen=True)
class Estimate:
    """Bytes to reserve before a load, and where the number came from."""

    bytes: int
    source: str  # "ledger" (this artifact, measured) | "learned" (its class) | "size_x_factor" (a guess)


def nearest_rank(sorted_values: list[int], percentile: float) -> int:
    """The nearest-rank percentile of an ascending list: with fewer than 1/(1-p) values, the largest."""
    rank = max(math.ceil(percentile * len(sorted_values)), 1)
    return sorted_values[rank - 1]


class FootprintLedger:
    """Measured footprints per ETag, with per-class statistics for artifacts not yet measured."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()  # record() may run from executor threads as well as the event loop
        self._footprints: dict[str, Footprint] = self._load()
        self._by_class: dict[str, list[int]] = {}  # class -> ascending per-instance footprints
        self._growth: dict[str, list[float]] = {}  # class -> ascending in-use / just-loaded ratios
        for footprint in self._footprints.values():
            self._index(footprint)

    @property
    def path(self) -> Path:
        return self._path

    def _load(self) -> dict[str, Footprint]:
        try:
            doc = json.loads(self._path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict) or not isinstance(doc.get("footprints"), dict):
                raise ValueError("expected an object with a 'footprints' object")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            log.warning("ledger.unreadable", extra={"path": str(self._path), "error": str(exc)})
            return {}
        footprints: dict[str, Footprint] = {}
        for etag, value in doc["footprints"].items():
            entry = _parse_entry(value)
            if entry is None:
                log.warning("ledger.bad_entry", extra={"path": str(self._path), "etag": etag, "value": repr(value)})
            else:
                footprints[etag] = entry
        return footprints

    def _index(self, footprint: Footprint) -> None:
        if footprint.model_class:
            bisect.insort(self._by_class.setdefault(footprint.model_class, []), footprint.per_instance)
            if footprint.growth is not None:
                bisect.insort(self._growth.setdefault(footprint.model_class, []), footprint.growth)

    def _unindex(self, footprint: Footprint) -> None:
        for table, value in ((self._by_class, footprint.per_instance), (self._growth, footprint.growth)):
            values = table.get(footprint.model_class or "")
            if values and value is not None:
                i = bisect.bisect_left(values, value)
                if i < len(values) and values[i] == value:
                    values.pop(i)

    def get(self, etag: str) -> int | None:
        with self._lock:
            entry = self._footprints.get(etag)
            return entry.bytes if entry else None

    def growth(self, model_class: str) -> float:
        """How much a just-loaded model of this class grows once it serves: a high percentile of the ratios
        measured for the class, 1.0 when none was measured."""
        with self._lock:
            ratios = self._growth.get(model_class)
            return min(max(nearest_rank(ratios, LEARNED_PERCENTILE), 1.0), MAX_LEARNED_GROWTH) if ratios else 1.0

    def knows_class(self, model_class: str) -> bool:
        """Whether any model of this class has been measured (the first of a class is loaded alone)."""
        with self._lock:
            return bool(self._by_class.get(model_class))

    def learned(self, model_class: str, ceiling: int | None = None) -> int | None:
        """The class's high-percentile footprint per instance, or None when none was measured. Footprints
        over `ceiling` (models too large to ever be served) are left out: one such model must not make
        every other model of its class look too large as well."""
        with self._lock:
            values = self._by_class.get(model_class, [])
            if ceiling is not None:
                values = values[: bisect.bisect_right(values, ceiling)]
            return nearest_rank(values, LEARNED_PERCENTILE) if values else None

    def estimate(self, etag: str, model_class: str, instances: int, fallback_per_instance: int,
                 ceiling: int | None = None) -> Estimate:
        """What to reserve for loading this artifact: its own measurement, else the larger of its class's
        learned footprint and the fallback guess, times its instances. A learned estimate never exceeds
        `ceiling` (the budget): what the class teaches is a guess, and a guess must not refuse a model."""
        measured = self.get(etag)
        if measured is not None:
            return Estimate(measured, "ledger")
        instances = max(instances, 1)
        learned = self.learned(model_class, ceiling)
        if learned is not None and learned > fallback_per_instance:
            total = learned * instances
            return Estimate(total if ceiling is None else min(total, ceiling), "learned")
        return Estimate(fallback_per_instance * instances, "size_x_factor")

    def record(self, etag: str, footprint_bytes: int, model_class: str | None = None, instances: int = 1,
               just_loaded: bool = False) -> bool:
        """Remember a measurement (`just_loaded`: taken right after a load, before any request) if it is news:
        the largest seen for this artifact, or its first just-loaded one. Persists the ledger atomically
        (temp file + os.replace). Returns whether the ledger changed."""
        if footprint_bytes < 0:
            raise ValueError(f"footprint must be >= 0 bytes, got {footprint_bytes}")
        with self._lock:
            old = self._footprints.get(etag)
            loaded = old.loaded if old else None
            if just_loaded and loaded is None:
                loaded = int(footprint_bytes)
            if (old is not None and old.bytes >= footprint_bytes and (old.model_class or not model_class)
                    and old.loaded == loaded):
                return False
            new = Footprint(max(int(footprint_bytes), old.bytes if old else 0), model_class or
                            (old.model_class if old else None), max(instances, 1), loaded)
            if old is not None:
                self._unindex(old)
            self._footprints[etag] = new
            self._index(new)
            snapshot = dict(self._footprints)
            try:
                self._write(snapshot)
            except OSError as exc:
                log.warning("ledger.not_saved", extra={"path": str(self._path), "error": str(exc)})
            return True

    def _write(self, footprints: dict[str, Footprint]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"version": _VERSION, "footprints": {
            etag: {"bytes": f.bytes, "loaded": f.loaded, "class": f.model_class, "instances": f.instances}
            for etag, f in footprints.items()
        }}
        fd, tmp = tempfile.mkstemp(prefix=f".{self._path.name}.", suffix=".tmp", dir=self._path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(doc, indent=1, sort_keys=True))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def __len__(self) -> int:
        with self._lock:
            return len(self._footprints)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_entry(value: object) -> Footprint | None:
    """A version-2 entry, or a version-1 bare byte count; None for anything else."""
    if _is_count(value):
        return Footprint(int(value))  # type: ignore[arg-type]
    if isinstance(value, dict) and _is_count(value.get("bytes")):
        model_class = value.get("class")
        instances = value.get("instances", 1)
        loaded = value.get("loaded")
        if ((model_class is None or isinstance(model_class, str)) and _is_count(instances) and instances >= 1
                and (loaded is None or (_is_count(loaded) and loaded > 0))):
            return Footprint(value["bytes"], model_class, instances, loaded)
    return None
