"""The routing decision, as a pure function of what the router knows: no I/O, no clock, a seeded random source.

Per request, for a TargetModel:
1. affinity: the healthy instances holding the model; among them `least-outstanding-requests` (fewest in
   flight, ties to the earlier one in the model's hash order, so an idle fleet keeps using one copy) or
   `random` (SageMaker's two strategies);
2. spill: when every holder has `spill_threshold` or more requests outstanding, the first non-holder in the
   model's hash order that is less busy gets it and loads one more copy (ModelMesh's rule; extra copies age
   out through the instances' own eviction); likewise when the model's request rate per copy passes
   `spill_rate` (a fast model that is hot never piles up outstanding requests), onto a non-holder no busier;
3. hash: a model nobody holds goes to the first instance in its rendezvous (highest-random-weight) order,
   weighted by free model memory, so independent routers agree and a model is loaded once.
Requests that name no model, and every request with affinity off, are balanced over all healthy instances.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

LEAST_OUTSTANDING = "least-outstanding-requests"
RANDOM = "random"


class Reason(str, Enum):
    AFFINITY = "affinity"  # an instance that holds the model
    HASH = "hash"  # a cold model, to its rendezvous-hash owner
    SPILL = "spill"  # a hot model, to one more instance
    FAILOVER = "failover"  # a retry after the chosen instance refused the connection
    BALANCE = "balance"  # no model to be affine to (or affinity off): any healthy instance


@dataclass(frozen=True)
class Candidate:
    """A healthy instance as the policy sees it."""

    name: str
    outstanding: int
    free_bytes: float | None  # None: not measured yet
    holds: bool


@dataclass(frozen=True)
class Decision:
    name: str
    reason: Reason


def _unit(model: str, instance: str) -> float:
    """A uniform number in (0, 1) from (model, instance): the same on every router."""
    digest = hashlib.blake2b(f"{model}\0{instance}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 2)


def hash_order(model: str, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Weighted rendezvous order: score -w / ln(u), highest first. Each instance wins a share of the models
    proportional to its weight (its free model memory; unmeasured ones count as the average of the others,
    and a full one still counts a little so that an all-full fleet keeps an order)."""
    known = [c.free_bytes for c in candidates if c.free_bytes is not None]
    average = sum(known) / len(known) if known else 1.0
    floor = max(average, 1.0) * 1e-3

    def score(c: Candidate) -> float:
        weight = max(average if c.free_bytes is None else c.free_bytes, floor)
        return -weight / math.log(_unit(model, c.name))

    return sorted(candidates, key=score, reverse=True)


def _pick(pool: Sequence[Candidate], strategy: str, rng: random.Random) -> Candidate:
    """`pool` is in preference order; LOR takes the first of the least busy."""
    if strategy == RANDOM:
        return rng.choice(list(pool))
    return min(pool, key=lambda c: c.outstanding)  # min() keeps the first of equals


def decide(model: str | None, candidates: Sequence[Candidate], strategy: str, spill_threshold: int,
           rng: random.Random, affinity: bool = True, rate: float = 0.0, spill_rate: float = 0.0) -> Decision | None:
    """Where one request goes, or None when there is no candidate (the caller answers 503). `rate` is the
    model's recent requests per second through this router."""
    if not candidates:
        return None
    if model is None or not affinity:
        ordered = hash_order(model, candidates) if model is not None else sorted(candidates, key=lambda c: c.name)
        return Decision(_pick(ordered, strategy, rng).name, Reason.BALANCE)
    ordered = hash_order(model, candidates)
    holders = [c for c in ordered if c.holds]
    if not holders:
        return Decision(ordered[0].name, Reason.HASH)
    least = min(h.outstanding for h in holders)
    if spill_threshold > 0 and least >= spill_threshold:
        spare = next((c for c in ordered if not c.holds and c.outstanding < least), None)
        if spare is not None:
            return Decision(spare.name, Reason.SPILL)
    if spill_rate > 0 and rate / len(holders) > spill_rate:
        spare = next((c for c in ordered if not c.holds and c.outstanding <= least), None)
        if spare is not None:
            return Decision(spare.name, Reason.SPILL)
    return Decision(_pick(holders, strategy, rng).name, Reason.AFFINITY)
