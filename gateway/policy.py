"""Eviction policies: which idle, resident models to unload first when memory is needed.

The memory manager owns *whether* to evict and *which models may* be evicted (idle, not pinned); a policy
only *orders* those candidates. Keeping the ordering pluggable lets us run SageMaker's behaviour (LRU) as the
default and compare a size- and cost-aware policy (GDSF) on the same traces.

Both policies are deliberately not thread-safe: they are driven from the gateway's single asyncio event loop,
where no two calls interleave, so locking would only add cost. Do not share one instance across threads.

Keys the policy has never seen (or has forgotten) that show up among the candidates are ordered *first*, as
the oldest / lowest-priority entries: a model we know nothing about is the cheapest bet to evict, and a
bookkeeping gap must never crash an eviction round.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

POLICIES: tuple[str, ...] = ("lru", "gdsf")

_UNKNOWN = -math.inf


@runtime_checkable
class EvictionPolicy(Protocol):
    """What the memory manager needs from an eviction policy."""

    name: str

    def record_load(self, key: str, size_bytes: int, load_cost_s: float) -> None:
        """The model `key` became resident, occupying `size_bytes` and having taken `load_cost_s` to load."""
        ...

    def record_hit(self, key: str) -> None:
        """An invocation used the resident model `key`."""
        ...

    def record_evict(self, key: str) -> None:
        """The model `key` left memory (evicted by us, or unloaded for any other reason)."""
        ...

    def victims(self, candidates: Iterable[str]) -> list[str]:
        """The candidates (idle, evictable keys), ordered best-to-evict first; duplicates are dropped."""
        ...


def _unique(candidates: Iterable[str]) -> list[str]:
    """Candidates in their given order without repeats, so a caller's duplicate never means a double eviction."""
    return list(dict.fromkeys(candidates))


class LRUPolicy:
    """Least recently used first: SageMaker multi-model endpoints' behaviour, and our default.

    Recency is a monotonic counter bumped on every load and hit, not wall-clock time: two events in the same
    clock tick still order strictly, and tests are deterministic.
    """

    name = "lru"

    def __init__(self) -> None:
        self._clock = 0
        self._last_use: dict[str, int] = {}

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def record_load(self, key: str, size_bytes: int, load_cost_s: float) -> None:
        """A (re)load counts as a use: the model was just needed."""
        self._last_use[key] = self._tick()

    def record_hit(self, key: str) -> None:
        """Refresh recency; a hit on a key we do not track is ignored (it is not resident as far as we know)."""
        if key in self._last_use:
            self._last_use[key] = self._tick()
        else:
            log.debug("lru: hit on untracked key %r ignored", key)

    def record_evict(self, key: str) -> None:
        self._last_use.pop(key, None)

    def victims(self, candidates: Iterable[str]) -> list[str]:
        """Oldest use first; unknown keys before all known ones, in the order given (the sort is stable)."""
        keys = _unique(candidates)
        return sorted(keys, key=lambda k: self._last_use.get(k, _UNKNOWN))

    def __len__(self) -> int:
        return len(self._last_use)


@dataclass
class _GDSFEntry:
    size_bytes: int
    cost_s: float
    freq: int
    priority: float
    last_use: int


class GDSFPolicy:
    """GreedyDual-Size-Frequency (Cherkasova 1998), adapted to model loading.

    Each resident model `k` has a priority

        H(k) = L + freq(k) * cost(k) / size(k)

    and the model with the lowest H is evicted first, where

    - `freq` counts uses since the model became resident (1 at load, +1 per hit);
    - `cost` is the measured load time in seconds (what a future miss would cost us again); a non-positive
      measurement falls back to 1.0 so a failed timing never makes a model look free to reload;
    - `size` is its memory footprint in bytes (at least 1), i.e. how much room evicting it frees;
    - `L` is the inflation value: when a model we offered as a victim is evicted, L rises to that model's H
      (it never decreases). H is only recomputed on load and hit, so models not used since L last rose keep
      their old, lower H and age out, while anything touched afterwards is priced above them.

    Why: with one GPU and thousands of models, pure LRU happily evicts a small, hot model that takes 20 s to
    load to make room for a big, rarely used one that loads in a second. GDSF keeps small, frequently used,
    expensive-to-load models resident and prefers evicting big, cheap, rarely used ones, while L keeps it
    from pinning a once-hot model forever.

    Ties (equal H) are broken by recency, least recently used first, then by the order of the candidates.
    """

    name = "gdsf"

    def __init__(self) -> None:
        self._clock = 0
        self._inflation = 0.0
        self._entries: dict[str, _GDSFEntry] = {}
        # Keys handed out by the latest victims() call and not yet evicted, re-used or re-loaded: an eviction
        # of one of these is a policy-driven eviction and inflates L; any other unload (model deleted,
        # Triton restarted) is not a choice the policy made and leaves L alone.
        self._offered: set[str] = set()

    @property
    def inflation(self) -> float:
        """The current inflation value L (for tests and metrics)."""
        return self._inflation

    def priority(self, key: str) -> float | None:
        """H of a resident model, or None if the policy does not track `key`."""
        entry = self._entries.get(key)
        return entry.priority if entry else None

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _price(self, entry: _GDSFEntry) -> float:
        return self._inflation + entry.freq * entry.cost_s / entry.size_bytes

    def record_load(self, key: str, size_bytes: int, load_cost_s: float) -> None:
        """Start (or restart) tracking `key` with freq 1; a new load also closes the current eviction round."""
        cost = load_cost_s if load_cost_s > 0 else 1.0
        entry = _GDSFEntry(size_bytes=max(1, int(size_bytes)), cost_s=float(cost), freq=1, priority=0.0,
                           last_use=self._tick())
        entry.priority = self._price(entry)
        self._entries[key] = entry
        self._offered.clear()

    def record_hit(self, key: str) -> None:
        """Count the use and re-price at the current L; a hit on a key we do not track is ignored."""
        entry = self._entries.get(key)
        if entry is None:
            log.debug("gdsf: hit on untracked key %r ignored", key)
            return
        entry.freq += 1
        entry.last_use = self._tick()
        entry.priority = self._price(entry)
        self._offered.discard(key)

    def record_evict(self, key: str) -> None:
        """Forget `key`; if we had offered it as a victim, raise L to its H (never lowering L)."""
        entry = self._entries.pop(key, None)
        if key in self._offered:
            self._offered.discard(key)
            if entry is not None and entry.priority > self._inflation:
                self._inflation = entry.priority
                log.debug("gdsf: inflation L -> %.6g after evicting %r", self._inflation, key)

    def victims(self, candidates: Iterable[str]) -> list[str]:
        """Lowest H first (ties: least recently used); unknown keys first of all, in the order given."""
        keys = _unique(candidates)

        def order(k: str) -> tuple[float, float]:
            entry = self._entries.get(k)
            if entry is None:
                return (_UNKNOWN, _UNKNOWN)
            return (entry.priority, float(entry.last_use))

        ranked = sorted(keys, key=order)
        self._offered = set(ranked)
        return ranked

    def __len__(self) -> int:
        return len(self._entries)


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by its configured name (case-insensitive); ValueError names the valid choices."""
    normalized = name.strip().lower()
    if normalized == "lru":
        return LRUPolicy()
    if normalized == "gdsf":
        return GDSFPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; valid policies: {', '.join(POLICIES)}")
