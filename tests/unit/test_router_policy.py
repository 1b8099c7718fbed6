"""The routing decision: affinity, rendezvous hashing weighted by free memory, spill, LOR and random."""

from __future__ import annotations

import random
from collections import Counter

from gateway.router.policy import LEAST_OUTSTANDING, RANDOM, Candidate, Reason, decide, hash_order

NAMES = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]


def fleet(outstanding: dict[str, int] | None = None, holders: set[str] = frozenset(),  # type: ignore[assignment]
          free: dict[str, float] | None = None) -> list[Candidate]:
    return [Candidate(n, (outstanding or {}).get(n, 0), (free or {}).get(n, 1e9), n in holders) for n in NAMES]


def test_no_candidate_is_no_decision() -> None:
    assert decide("m", [], LEAST_OUTSTANDING, 8, random.Random(0)) is None


def test_a_cold_model_goes_to_the_same_instance_whatever_the_candidates_order() -> None:
    cands = fleet()
    first = decide("cities/Houston_TX.tar.gz", cands, LEAST_OUTSTANDING, 8, random.Random(0))
    again = decide("cities/Houston_TX.tar.gz", list(reversed(cands)), RANDOM, 8, random.Random(1))
    assert first is not None and again is not None
    assert first.reason is Reason.HASH and first == again


def test_hashing_spreads_models_and_moves_only_the_departed_instances_models() -> None:
    models = [f"m{i}" for i in range(600)]
    owner = {m: hash_order(m, fleet())[0].name for m in models}
    shares = Counter(owner.values())
    assert all(150 < shares[n] < 250 for n in NAMES), shares
    survivors = [c for c in fleet() if c.name != NAMES[0]]
    for m in models:
        if owner[m] != NAMES[0]:
            assert hash_order(m, survivors)[0].name == owner[m]  # rendezvous: no reshuffle of the others


def test_free_memory_weights_the_hash() -> None:
    free = {NAMES[0]: 8e9, NAMES[1]: 1e9, NAMES[2]: 1e9}
    shares = Counter(hash_order(f"m{i}", fleet(free=free))[0].name for i in range(1000))
    assert shares[NAMES[0]] > 700, shares  # 8/10 of the models, give or take


def test_a_full_instance_still_has_a_place_in_the_order() -> None:
    free = {NAMES[0]: 0.0, NAMES[1]: 0.0, NAMES[2]: 0.0}
    assert len(hash_order("m", fleet(free=free))) == 3


def test_affinity_beats_the_hash() -> None:
    owner = hash_order("m", fleet())[0].name
    other = next(n for n in NAMES if n != owner)
    d = decide("m", fleet(holders={other}), LEAST_OUTSTANDING, 8, random.Random(0))
    assert d is not None and (d.name, d.reason) == (other, Reason.AFFINITY)


def test_lor_picks_the_least_busy_holder() -> None:
    d = decide("m", fleet(outstanding={NAMES[0]: 3, NAMES[1]: 1, NAMES[2]: 0}, holders={NAMES[0], NAMES[1]}),
               LEAST_OUTSTANDING, 8, random.Random(0))
    assert d is not None and (d.name, d.reason) == (NAMES[1], Reason.AFFINITY)


def test_random_uses_every_holder_and_only_holders() -> None:
    rng = random.Random(0)
    cands = fleet(outstanding={NAMES[0]: 5}, holders={NAMES[0], NAMES[1]})
    picked = Counter(d.name for d in (decide("m", cands, RANDOM, 8, rng) for _ in range(400)) if d)
    assert set(picked) == {NAMES[0], NAMES[1]} and min(picked.values()) > 150


def test_a_hot_model_spills_to_the_next_instance_in_its_hash_order() -> None:
    order = [c.name for c in hash_order("hot", fleet())]
    cands = fleet(outstanding={order[0]: 8}, holders={order[0]})
    d = decide("hot", cands, LEAST_OUTSTANDING, 8, random.Random(0))
    assert d is not None and (d.name, d.reason) == (order[1], Reason.SPILL)
    below = decide("hot", fleet(outstanding={order[0]: 7}, holders={order[0]}), LEAST_OUTSTANDING, 8,
                   random.Random(0))
    assert below is not None and (below.name, below.reason) == (order[0], Reason.AFFINITY)


def test_no_spill_onto_an_instance_as_busy_or_when_disabled() -> None:
    order = [c.name for c in hash_order("hot", fleet())]
    busy = fleet(outstanding={n: 9 for n in NAMES}, holders={order[0]})
    d = decide("hot", busy, LEAST_OUTSTANDING, 8, random.Random(0))
    assert d is not None and d.reason is Reason.AFFINITY
    off = decide("hot", fleet(outstanding={order[0]: 50}, holders={order[0]}), LEAST_OUTSTANDING, 0,
                 random.Random(0))
    assert off is not None and off.reason is Reason.AFFINITY


def test_requests_without_a_model_and_affinity_off_balance_over_all() -> None:
    cands = fleet(outstanding={NAMES[0]: 2, NAMES[1]: 0, NAMES[2]: 1}, holders={NAMES[0]})
    none = decide(None, cands, LEAST_OUTSTANDING, 8, random.Random(0))
    off = decide("m", cands, LEAST_OUTSTANDING, 8, random.Random(0), affinity=False)
    assert none is not None and off is not None
    assert (none.name, none.reason) == (NAMES[1], Reason.BALANCE) == (off.name, off.reason)


def test_a_fast_hot_model_spills_on_its_request_rate() -> None:
    order = [c.name for c in hash_order("hot", fleet())]
    one_copy = fleet(holders={order[0]})
    hot = decide("hot", one_copy, LEAST_OUTSTANDING, 8, random.Random(0), rate=120.0, spill_rate=100.0)
    assert hot is not None and (hot.name, hot.reason) == (order[1], Reason.SPILL)
    two_copies = fleet(holders={order[0], order[1]})  # 60/s per copy: enough copies
    enough = decide("hot", two_copies, LEAST_OUTSTANDING, 8, random.Random(0), rate=120.0, spill_rate=100.0)
    assert enough is not None and enough.reason is Reason.AFFINITY
    off = decide("hot", one_copy, LEAST_OUTSTANDING, 8, random.Random(0), rate=1e6, spill_rate=0.0)
    assert off is not None and off.reason is Reason.AFFINITY
