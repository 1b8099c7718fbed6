"""The routing table over a fleet: a refused connection is retried once elsewhere and takes the instance out,
a second refusal is a 503 reason, outstanding counts always come back to zero, and cold placements stick."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.router.discovery import Endpoint
from gateway.router.fleet import Fleet, Instance
from gateway.router.metrics import RouterMetrics
from gateway.router.policy import LEAST_OUTSTANDING
from gateway.router.table import ConnectFailed, NoInstance, RateMeter, RoutingTable


def table(n: int = 3) -> RoutingTable:
    fleet = Fleet()
    fleet.update([Endpoint(f"10.0.0.{i}", 8080, 8081) for i in range(1, n + 1)])
    for instance in fleet.instances.values():
        fleet.mark_up(instance)
    return RoutingTable(fleet, RouterMetrics(LEAST_OUTSTANDING), LEAST_OUTSTANDING, 8, rng=random.Random(0))


def decisions(t: RoutingTable) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in t.metrics.decisions.collect() for s in m.samples
            if s.name.endswith("_total")}


def test_a_refused_connection_goes_once_elsewhere_and_takes_the_instance_out() -> None:
    t = table()
    tried: list[str] = []

    async def attempt(instance: Instance) -> str:
        tried.append(instance.name)
        assert instance.outstanding == 1
        if len(tried) == 1:
            raise ConnectFailed("connection refused")
        return "answer"

    instance, answer = asyncio.run(t.forward("m", attempt))
    assert answer == "answer" and instance.name == tried[1] != tried[0]
    assert not t.fleet.instances[tried[0]].healthy
    assert decisions(t) == {"hash": 1.0, "failover": 1.0}
    assert all(i.outstanding == 0 for i in t.fleet.instances.values())


def test_a_second_refusal_is_no_instance_with_both_named() -> None:
    t = table()

    async def refuse(instance: Instance) -> str:
        raise ConnectFailed("connection refused")

    with pytest.raises(NoInstance) as err:
        asyncio.run(t.forward("m", refuse))
    assert "refused" in str(err.value) and "10.0.0." not in str(err.value)  # addresses stay in the log
    assert len(t.fleet.healthy()) == 1
    assert all(i.outstanding == 0 for i in t.fleet.instances.values())


def test_an_error_after_sending_is_not_retried() -> None:
    t = table()
    tried: list[str] = []

    async def reset(instance: Instance) -> str:
        tried.append(instance.name)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(ConnectionResetError):
        asyncio.run(t.forward("m", reset))
    assert len(tried) == 1 and len(t.fleet.healthy()) == 3


def test_no_healthy_instance_says_why() -> None:
    t = table()
    for instance in list(t.fleet.instances.values()):
        t.fleet.mark_down(instance, "test")
    with pytest.raises(NoInstance, match="no healthy gateway instance: 3 known") as err:
        t.pick("m", set())
    assert "10.0.0." not in str(err.value)
    with pytest.raises(NoInstance, match="no gateway instance discovered yet"):
        table(0).pick("m", set())


def test_a_cold_model_sticks_to_its_first_instance_while_it_loads() -> None:
    t = table()
    first, reason = t.pick("m", set())
    assert reason.value == "hash"
    first.outstanding = 3  # busy loading; the others idle
    again, reason = t.pick("m", set())
    assert (again, reason.value) == (first, "affinity")


def test_an_instance_back_in_has_forgotten_its_models() -> None:
    t = table()
    instance, _ = t.pick("m", set())
    t.fleet.mark_down(instance, "test")
    t.fleet.mark_up(instance)
    assert not instance.holds("m")


def test_the_rate_meter_decays() -> None:
    now = [0.0]
    meter = RateMeter(window_s=10.0, clock=lambda: now[0])
    for _ in range(100):
        rate = meter.hit("m")
    assert rate == pytest.approx(10.0)  # 100 requests in no time over a 10 s window
    now[0] = 10.0
    assert meter.hit("m") == pytest.approx(100 * 0.3679 / 10 + 0.1, rel=1e-3)
    assert meter.hit("other") == pytest.approx(0.1)


def test_a_model_past_the_spill_rate_gets_one_more_copy_then_stays() -> None:
    now = [0.0]
    t = table()
    t.spill_rate, t.meter = 5.0, RateMeter(window_s=10.0, clock=lambda: now[0])
    reasons = [t.pick("m", set())[1].value for _ in range(80)]  # 8/s over the window: two copies hold 4/s each
    assert reasons.count("hash") == 1 and reasons.count("spill") == 1, reasons
    assert sum(i.holds("m") for i in t.fleet.instances.values()) == 2
    reasons = [t.pick("m", set())[1].value for _ in range(40)]  # 12/s: a third copy
    assert reasons.count("spill") == 1 and sum(i.holds("m") for i in t.fleet.instances.values()) == 3
