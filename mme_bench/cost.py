"""Cost analysis: price per million invocations, one multi-model endpoint against N single-model ones,
the break-even model count, and the recommended profile and concurrency.

Prices come from the one price file (gateway/data/profiles.json) through gateway.profiles. A month is
720 hours: the numbers of the AWS blog post "Save on inference costs by using Amazon SageMaker multi-model endpoints" imply it (1,000 endpoints x 2 instances x $0.119 x 720 h = $171,360).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from mme_bench.config import HOURS_PER_MONTH

# Seed 001, as printed there (ml.c5.large single-model endpoints vs one ml.r5.2xlarge MME, 2 instances each).
SEED_SINGLE = ("ml.c5.large", 0.119)
SEED_MME = ("ml.r5.2xlarge", 0.706)
SEED_INSTANCES = 2
SEED_1000_SINGLE_MONTHLY = 171_360.0  # "1 か月あたり 171,360 USD"
SEED_1000_MME_MONTHLY = 1_017.0  # "1,017 USD" (the exact product is 1,016.64)
# "月あたり 3,000 USD を節約" for 10 models; the chart with its prices is not in the text
SEED_10_CLAIMED_SAVING = 3_000.0


def cost_per_million(price_per_hour: float, tps: float | None) -> float | None:
    """USD per million invocations on one instance kept busy at `tps`: price / (tps x 3600) x 1e6."""
    if not tps or tps <= 0:
        return None
    return price_per_hour / (tps * 3600.0) * 1e6


def monthly_cost(price_per_hour: float, instances: int, endpoints: int = 1,
                 hours: float = HOURS_PER_MONTH) -> float:
    """USD per month for `endpoints` endpoints of `instances` instances each."""
    return price_per_hour * instances * endpoints * hours


@dataclass(frozen=True)
class Comparison:
    """N single-model endpoints against the multi-model endpoints that host the same N models."""

    models: int
    single_profile: str
    single_price: float
    single_instances: int
    single_monthly: float
    mme_profile: str
    mme_price: float
    mme_instances: int
    mme_endpoints: int
    mme_monthly: float

    @property
    def saving(self) -> float:
        return self.single_monthly - self.mme_monthly

    @property
    def saving_pct(self) -> float:
        return 100.0 * self.saving / self.single_monthly if self.single_monthly else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "models": self.models, "single_profile": self.single_profile, "single_price_per_hour": self.single_price,
            "single_instances": self.single_instances, "single_endpoints": self.models,
            "single_monthly_usd": round(self.single_monthly, 2), "mme_profile": self.mme_profile,
            "mme_price_per_hour": self.mme_price, "mme_instances": self.mme_instances,
            "mme_endpoints": self.mme_endpoints, "mme_monthly_usd": round(self.mme_monthly, 2),
            "saving_usd": round(self.saving, 2), "saving_pct": round(self.saving_pct, 2),
        }


def mme_endpoints_needed(models: int, models_per_endpoint: int | None) -> int:
    return 1 if models_per_endpoint is None else max(1, math.ceil(models / models_per_endpoint))


def compare(models: int, single: tuple[str, float], single_instances: int, mme: tuple[str, float],
            mme_instances: int, models_per_endpoint: int | None = None,
            hours: float = HOURS_PER_MONTH) -> Comparison:
    """Monthly cost of `models` single-model endpoints vs the MME endpoints hosting them."""
    endpoints = mme_endpoints_needed(models, models_per_endpoint)
    return Comparison(
        models=models, single_profile=single[0], single_price=single[1], single_instances=single_instances,
        single_monthly=monthly_cost(single[1], single_instances, models, hours),
        mme_profile=mme[0], mme_price=mme[1], mme_instances=mme_instances, mme_endpoints=endpoints,
        mme_monthly=monthly_cost(mme[1], mme_instances, endpoints, hours),
    )


def break_even_models(single_price: float, single_instances: int, mme_price: float, mme_instances: int,
                      models_per_endpoint: int | None = None, hours: float = HOURS_PER_MONTH) -> int | None:
    """The smallest model count at which the MME costs strictly less than one endpoint per model.

    With one MME endpoint for all models the MME cost is flat, so the answer is floor(mme / single) + 1.
    With a capacity per MME endpoint the MME cost steps up every `models_per_endpoint` models; if a full
    MME endpoint costs no less than that many single-model endpoints it never wins (None); otherwise it can
    briefly lose again right after each new endpoint is added (the comparison table shows those counts).
    """
    per_model = monthly_cost(single_price, single_instances, 1, hours)
    per_mme = monthly_cost(mme_price, mme_instances, 1, hours)
    if per_model <= 0:
        return None
    if models_per_endpoint is None:
        return math.floor(per_mme / per_model) + 1
    if per_model * models_per_endpoint <= per_mme:
        return None
    n = 1
    while n * per_model <= mme_endpoints_needed(n, models_per_endpoint) * per_mme:
        n += 1
    return n


def seed_check(hours: float = HOURS_PER_MONTH) -> dict[str, Any]:
    """The AWS blog post's 10- and 1,000-model cases recomputed from its own prices, to check the math."""
    rows = [compare(n, SEED_SINGLE, SEED_INSTANCES, SEED_MME, SEED_INSTANCES, hours=hours) for n in (10, 1000)]
    ten, thousand = rows
    notes = [
        f"1,000 models: {thousand.models} x {SEED_INSTANCES} x ${SEED_SINGLE[1]} x {hours:g} h = "
        f"${thousand.single_monthly:,.2f}/month (seed: ${SEED_1000_SINGLE_MONTHLY:,.0f}); one MME: {SEED_INSTANCES} x "
        f"${SEED_MME[1]} x {hours:g} h = ${thousand.mme_monthly:,.2f} (seed: ${SEED_1000_MME_MONTHLY:,.0f}); "
        f"saving {thousand.saving_pct:.1f}% (seed: 99%).",
        f"10 models: ${ten.single_monthly:,.2f} vs ${ten.mme_monthly:,.2f}/month, a saving of ${ten.saving:,.2f}. "
        f"The blog post's ${SEED_10_CLAIMED_SAVING:,.0f}/month saving for 10 models does not follow from these prices "
        "(its chart, not in the text, used other instances). For reference, 10 single-model endpoints against one "
        f"MME of the same type, {SEED_INSTANCES} instances each, save 9 x {SEED_INSTANCES} x {hours:g} h x price; "
        f"${SEED_10_CLAIMED_SAVING:,.0f} would need a price of "
        f"${SEED_10_CLAIMED_SAVING / (9 * SEED_INSTANCES * hours):.3f}/h.",
        f"Break-even at these prices: one MME is cheaper from "
        f"{break_even_models(SEED_SINGLE[1], SEED_INSTANCES, SEED_MME[1], SEED_INSTANCES, hours=hours)} models on.",
    ]
    return {"rows": [r.row() for r in rows], "notes": notes,
            "matches_seed": round(thousand.single_monthly, 2) == SEED_1000_SINGLE_MONTHLY
            and round(thousand.mme_monthly) == SEED_1000_MME_MONTHLY}


# -- recommendation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One measured configuration that could be recommended."""

    target: str
    profile: str | None
    benchmark: str
    max_concurrency: int | None
    clients: int | None
    p99_ms: float | None
    error_rate: float
    tps: float | None
    cost_per_million: float | None


def describe(c: Candidate) -> str:
    """How a configuration reads in a sentence."""
    load = f"max-concurrency {c.max_concurrency}, {c.clients} clients" if c.max_concurrency is not None \
        else f"{c.clients} client(s), {c.benchmark} run"
    return f"{c.profile or c.target} ({c.target}; {load})"


@dataclass(frozen=True)
class Recommendation:
    chosen: Candidate | None
    reason: str


def recommend(candidates: Sequence[Candidate], target_p99_ms: float, max_error_rate: float) -> Recommendation:
    """The cheapest configuration (cost per million invocations) whose p99 meets the target and whose error
    rate is within the bound; ties go to the lower p99. Without one, say what missed and by how much."""
    # (cost, p99, candidate) for the candidates that can be judged at all: priced and with a latency
    priced = [(c.cost_per_million, c.p99_ms, c) for c in candidates
              if c.cost_per_million is not None and c.p99_ms is not None]
    if not priced:
        return Recommendation(None, "no configuration had both a measured throughput and a priced profile "
                                    "(give targets an instance_type from the profiles file)")
    meeting = [p for p in priced if p[1] <= target_p99_ms and p[2].error_rate <= max_error_rate]
    if not meeting:
        _, p99, best = min(priced, key=lambda p: p[1])
        return Recommendation(None, (
            f"no configuration met p99 <= {target_p99_ms:g} ms with error rate <= {max_error_rate:.2%}; the "
            f"lowest p99 was {p99:.1f} ms ({describe(best)}, error rate {best.error_rate:.2%}). "
            "Raise the target, or add memory or instances."))
    cpm, p99, chosen = min(meeting, key=lambda p: (p[0], p[1]))
    others = len(meeting) - 1
    return Recommendation(chosen, (
        f"{describe(chosen)}: the lowest cost per million invocations (${cpm:.4f} at {chosen.tps or 0:.1f} "
        f"invocations/s) among the {len(meeting)} configuration(s) whose p99 ({p99:.1f} ms) meets the "
        f"{target_p99_ms:g} ms target with error rate {chosen.error_rate:.2%} <= {max_error_rate:.2%}"
        + (f"; {others} other(s) met the target at a higher cost." if others else ".")))
