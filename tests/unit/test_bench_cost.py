"""Cost math against seed 001's own numbers and hand calculations."""

from __future__ import annotations

import pytest

from mme_bench import cost
from mme_bench.config import HOURS_PER_MONTH
from gateway.profiles import load_profiles


def test_a_month_is_720_hours_as_the_seed_implies() -> None:
    assert HOURS_PER_MONTH == 720.0
    assert 171_360 / (1000 * 2 * 0.119) == pytest.approx(HOURS_PER_MONTH)


def test_seed_1000_models_single_model_endpoints_cost_171360_a_month() -> None:
    c = cost.compare(1000, ("ml.c5.large", 0.119), 2, ("ml.r5.2xlarge", 0.706), 2)
    assert c.single_monthly == pytest.approx(171_360.0)
    assert c.mme_monthly == pytest.approx(1_016.64)  # the seed rounds it to $1,017
    assert c.mme_endpoints == 1
    assert c.saving == pytest.approx(170_343.36)
    assert c.saving_pct == pytest.approx(99.4067, abs=1e-3)  # the seed: "99% reduction"


def test_seed_10_models_case() -> None:
    c = cost.compare(10, ("ml.c5.large", 0.119), 2, ("ml.r5.2xlarge", 0.706), 2)
    assert c.single_monthly == pytest.approx(1_713.60)  # 10 x 2 x 0.119 x 720
    assert c.mme_monthly == pytest.approx(1_016.64)
    assert c.saving == pytest.approx(696.96)


def test_seed_check_reproduces_the_seed_and_flags_the_10_model_claim() -> None:
    check = cost.seed_check()
    assert check["matches_seed"] is True
    by_models = {r["models"]: r for r in check["rows"]}
    assert by_models[1000]["single_monthly_usd"] == 171_360.0
    assert by_models[1000]["mme_monthly_usd"] == 1_016.64
    assert by_models[10]["single_monthly_usd"] == 1_713.60
    assert any("3,000" in n and "does not follow" in n for n in check["notes"])
    assert any("from 6 models on" in n for n in check["notes"])


def test_seed_prices_are_the_ones_in_the_profiles_file() -> None:
    profiles = load_profiles()
    assert profiles["ml.c5.large"].price_per_hour == cost.SEED_SINGLE[1]
    assert profiles["ml.r5.2xlarge"].price_per_hour == cost.SEED_MME[1]


def test_cost_per_million_invocations() -> None:
    # $0.706/h at 100 invocations/s: 360,000 invocations an hour -> 0.706 / 360000 x 1e6 = $1.9611
    assert cost.cost_per_million(0.706, 100.0) == pytest.approx(1.961111, rel=1e-6)
    assert cost.cost_per_million(1.408, 1000.0) == pytest.approx(1.408 / 3.6)
    assert cost.cost_per_million(1.0, 0.0) is None and cost.cost_per_million(1.0, None) is None


def test_break_even_model_count() -> None:
    # single: 2 x 0.119 x 720 = 171.36 per model; MME: 2 x 0.706 x 720 = 1016.64 -> 5.93 -> 6 models
    assert cost.break_even_models(0.119, 2, 0.706, 2) == 6
    assert 5 * 171.36 < 1016.64 < 6 * 171.36
    # the same instance type on both sides: one MME is cheaper from 2 models on
    assert cost.break_even_models(0.119, 2, 0.119, 2) == 2
    # capacity 4 models per MME endpoint: 4 x 171.36 = 685.44 < 1016.64 per endpoint -> never cheaper
    assert cost.break_even_models(0.119, 2, 0.706, 2, models_per_endpoint=4) is None
    # capacity 10: the first MME endpoint pays off at 6 models. At 11 a second one is needed and single-model
    # endpoints are briefly cheaper again (1,884.96 < 2,033.28), from 12 models on the MME wins for good.
    assert cost.break_even_models(0.119, 2, 0.706, 2, models_per_endpoint=10) == 6
    eleven = cost.compare(11, ("a", 0.119), 2, ("b", 0.706), 2, models_per_endpoint=10)
    assert eleven.mme_endpoints == 2 and eleven.single_monthly == pytest.approx(1_884.96)
    assert eleven.mme_monthly == pytest.approx(2_033.28) and eleven.saving < 0


def cand(target: str, p99: float, err: float, cpm: float | None, mc: int = 2, tps: float = 100.0) -> cost.Candidate:
    return cost.Candidate(target, f"ml.{target}", "concurrency", mc, mc * 2, p99, err, tps, cpm)


def test_recommend_picks_the_cheapest_configuration_that_meets_the_target() -> None:
    cands = [cand("cheap-slow", 900, 0.0, 0.10), cand("ok", 200, 0.0, 0.50), cand("best", 240, 0.005, 0.30),
             cand("errors", 50, 0.05, 0.20)]
    rec = cost.recommend(cands, target_p99_ms=250, max_error_rate=0.01)
    assert rec.chosen is not None and rec.chosen.target == "best"
    assert "lowest cost per million" in rec.reason and "1 other(s) met the target" in rec.reason


def test_recommend_explains_when_nothing_meets_the_target() -> None:
    rec = cost.recommend([cand("a", 900, 0.0, 0.1), cand("b", 300, 0.2, 0.2)], target_p99_ms=250,
                         max_error_rate=0.01)
    assert rec.chosen is None
    assert "no configuration met" in rec.reason and "300.0 ms" in rec.reason
    assert cost.recommend([cand("a", 10, 0.0, None)], 250, 0.01).chosen is None
