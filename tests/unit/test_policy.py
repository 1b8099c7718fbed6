"""Eviction policies: LRU order, GDSF pricing and inflation, robustness to keys the policy never saw."""

from __future__ import annotations

import pytest

from gateway.policy import POLICIES, EvictionPolicy, GDSFPolicy, LRUPolicy, make_policy

GIB = 1024**3
MIB = 1024**2


def test_make_policy_names_and_protocol() -> None:
    assert POLICIES == ("lru", "gdsf")
    for name in POLICIES:
        policy = make_policy(name)
        assert policy.name == name
        assert isinstance(policy, EvictionPolicy)
    assert isinstance(make_policy(" LRU "), LRUPolicy)
    with pytest.raises(ValueError) as err:
        make_policy("fifo")
    assert "lru" in str(err.value) and "gdsf" in str(err.value)


def test_lru_orders_by_last_use() -> None:
    lru = LRUPolicy()
    for key in ("a", "b", "c"):
        lru.record_load(key, 1, 1.0)
    assert lru.victims(["a", "b", "c"]) == ["a", "b", "c"]
    lru.record_hit("a")
    assert lru.victims(["c", "b", "a"]) == ["b", "c", "a"]
    lru.record_hit("b")
    assert lru.victims(["a", "b", "c"]) == ["c", "a", "b"]


def test_lru_only_orders_given_candidates_and_forgets_evicted() -> None:
    lru = LRUPolicy()
    for key in ("a", "b", "c"):
        lru.record_load(key, 1, 1.0)
    assert lru.victims(["c", "b"]) == ["b", "c"]  # "a" is busy/pinned: not a candidate, never returned
    lru.record_evict("a")
    assert len(lru) == 2
    lru.record_load("a", 1, 1.0)  # reloaded: now the most recent
    assert lru.victims(["a", "b", "c"]) == ["b", "c", "a"]


def test_lru_unknown_keys_first_and_no_crash() -> None:
    lru = LRUPolicy()
    lru.record_load("known", 1, 1.0)
    lru.record_hit("ghost")  # a hit on an untracked key is ignored
    lru.record_evict("ghost")  # so is an eviction
    assert lru.victims(["known", "x", "y", "x"]) == ["x", "y", "known"]


def test_gdsf_prefers_evicting_big_cheap_rare() -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load("small_expensive_hot", 100 * MIB, 20.0)
    gdsf.record_load("big_cheap_cold", 4 * GIB, 1.0)
    for _ in range(5):
        gdsf.record_hit("small_expensive_hot")
    # LRU would evict the hot model first (it was loaded first); GDSF must not.
    assert gdsf.victims(["small_expensive_hot", "big_cheap_cold"]) == ["big_cheap_cold", "small_expensive_hot"]


@pytest.mark.parametrize(
    ("loser", "winner"),
    [
        (("big", 4 * GIB, 5.0), ("small", 100 * MIB, 5.0)),  # same cost: bigger goes first
        (("cheap", GIB, 0.5), ("expensive", GIB, 30.0)),  # same size: cheaper to reload goes first
    ],
)
def test_gdsf_size_and_cost_each_matter(loser: tuple[str, int, float], winner: tuple[str, int, float]) -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load(winner[0], winner[1], winner[2])
    gdsf.record_load(loser[0], loser[1], loser[2])  # loaded last: LRU would keep it
    assert gdsf.victims([winner[0], loser[0]]) == [loser[0], winner[0]]


def test_gdsf_frequency_matters() -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load("rare", GIB, 2.0)
    gdsf.record_load("frequent", GIB, 2.0)
    gdsf.record_hit("frequent")
    gdsf.record_hit("rare")  # most recent, but used twice vs three times
    gdsf.record_hit("frequent")
    assert gdsf.victims(["frequent", "rare"]) == ["rare", "frequent"]


def test_gdsf_priority_formula_and_cost_fallback() -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load("m", 1000, 2.0)
    assert gdsf.priority("m") == pytest.approx(2.0 / 1000)
    gdsf.record_hit("m")
    assert gdsf.priority("m") == pytest.approx(2 * 2.0 / 1000)
    gdsf.record_load("zero_cost", 1000, 0.0)  # failed timing: cost falls back to 1.0
    assert gdsf.priority("zero_cost") == pytest.approx(1.0 / 1000)
    gdsf.record_load("zero_size", 0, 3.0)  # size clamps to 1 byte
    assert gdsf.priority("zero_size") == pytest.approx(3.0)
    assert gdsf.priority("nope") is None


def test_gdsf_ties_broken_by_recency() -> None:
    gdsf = GDSFPolicy()
    for key in ("a", "b", "c"):
        gdsf.record_load(key, GIB, 1.0)
    assert gdsf.victims(["c", "a", "b"]) == ["a", "b", "c"]


def test_gdsf_inflation_rises_after_victim_evictions() -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load("a", 1000, 1.0)  # H = 0.001
    gdsf.record_load("b", 1000, 5.0)  # H = 0.005
    assert gdsf.inflation == 0.0

    order = gdsf.victims(["a", "b"])
    assert order[0] == "a"
    h_a = gdsf.priority("a")
    gdsf.record_evict("a")
    assert gdsf.inflation == pytest.approx(h_a)

    # A model loaded after the inflation rose is priced on top of L: it outranks an equal, older one.
    gdsf.record_load("c", 1000, 1.0)
    assert gdsf.priority("c") == pytest.approx(h_a + 0.001)

    gdsf.victims(["b", "c"])
    h_c = gdsf.priority("c")
    assert h_c is not None and h_c < gdsf.priority("b")  # type: ignore[operator]
    gdsf.record_evict("c")
    assert gdsf.inflation == pytest.approx(h_c)
    assert gdsf.inflation > h_a  # type: ignore[operator]


def test_gdsf_inflation_ages_out_idle_models() -> None:
    """Without inflation a once-hot model would be kept forever; with it, new traffic overtakes it."""
    gdsf = GDSFPolicy()
    gdsf.record_load("once_hot", 1000, 1.0)
    for _ in range(9):
        gdsf.record_hit("once_hot")  # H = 0.010
    for i in range(20):
        gdsf.record_load(f"new{i}", 1000, 1.0)
        victim = gdsf.victims([k for k in ("once_hot", f"new{i}") if gdsf.priority(k) is not None])[0]
        gdsf.record_evict(victim)
        if victim == "once_hot":
            break
    else:
        pytest.fail("the idle once-hot model was never evicted")
    assert gdsf.inflation >= 0.010 - 1e-12


def test_gdsf_non_victim_unload_leaves_inflation() -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load("a", 1000, 1.0)
    gdsf.record_load("b", 1000, 1.0)
    gdsf.record_evict("b")  # unloaded without being offered as a victim (e.g. model deleted)
    assert gdsf.inflation == 0.0
    gdsf.victims(["a"])
    gdsf.record_hit("a")  # used again after being offered: the eviction round no longer covers it
    gdsf.record_evict("a")
    assert gdsf.inflation == 0.0
    assert len(gdsf) == 0


def test_gdsf_unknown_keys_first_and_no_crash() -> None:
    gdsf = GDSFPolicy()
    gdsf.record_load("known", 4 * GIB, 0.1)
    gdsf.record_hit("ghost")
    gdsf.record_evict("ghost")
    assert gdsf.victims(["known", "ghost2", "ghost1", "ghost2"]) == ["ghost2", "ghost1", "known"]
    gdsf.record_evict("ghost2")  # offered but unknown: evicting it must not move L
    assert gdsf.inflation == 0.0
    assert gdsf.victims([]) == []
