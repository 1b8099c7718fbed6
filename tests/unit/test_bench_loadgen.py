"""The load drivers against a small real HTTP server: counts, concurrency, open-loop waits, cold flags."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from mme_bench.client import Invoker
from mme_bench.config import PayloadConfig
from mme_bench.loadgen import Segment, SessionContext, run_closed, run_open, run_sequential, warm_up
from mme_bench.workload import ModelChooser, PayloadCycle, make_payload
from gateway.metrics import Metrics
from gateway.triton.process import free_port

PAYLOADS = [make_payload(0, {"Body": "1,2,3,4,5,6", "ContentType": "text/csv"}, PayloadConfig(examples=({},)))]


class FakeGateway:
    """Answers /invocations after `delay_s`, counts a cache miss the first time it sees a model, serves
    /metrics from the gateway's own registry, and remembers the most requests it had in flight."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.metrics = Metrics()
        self.loaded: set[str] = set()
        self.in_flight = 0
        self.peak = 0

    def app(self) -> web.Application:
        async def invocations(request: web.Request) -> web.Response:
            key = request.headers["X-Amzn-SageMaker-Target-Model"]
            result = "hit" if key in self.loaded else "miss"
            self.loaded.add(key)
            self.metrics.cache_requests.labels(result=result).inc()
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
            return web.json_response({"outputs": []})

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), content_type="text/plain")

        app = web.Application()
        app.router.add_post("/invocations", invocations)
        app.router.add_get("/metrics", metrics)
        return app


def drive(delay_s: float, test: Callable[[SessionContext], Awaitable[None]]) -> FakeGateway:
    gw = FakeGateway(delay_s)

    async def main() -> None:
        runner = web.AppRunner(gw.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with Invoker(f"http://127.0.0.1:{port}", 5, 2) as inv, aiohttp.ClientSession() as scraper:
                ctx = SessionContext("t", "t-s", "target", inv, scraper, ModelChooser(["a", "b", "c"], 1.0, 7),
                                     PayloadCycle(PAYLOADS), time.monotonic(), progress=False)
                await test(ctx)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return gw


def test_sequential_run_flags_cold_calls_from_the_miss_counter() -> None:
    out: list[Segment] = []

    async def test(ctx: SessionContext) -> None:
        out.append(await run_sequential(ctx, 12, "sequential"))

    drive(0.0, test)
    seg = out[0]
    assert len(seg.records) == 12 and all(r.ok for r in seg.records)
    models = [r.model for r in seg.records]
    cold = [r.model for r in seg.records if r.cold]
    assert cold == list(dict.fromkeys(models))  # exactly the first call of each model
    assert all(r.first_call == r.cold for r in seg.records)
    assert seg.before is not None and seg.after is not None and seg.exact_cold
    assert seg.elapsed_s == pytest.approx(sum(r.latency_ms for r in seg.records) / 1000)


def test_closed_loop_keeps_the_client_count_and_the_invocation_budget() -> None:
    out: list[Segment] = []

    async def test(ctx: SessionContext) -> None:
        out.append(await run_closed(ctx, clients=3, level="c=3", duration_s=None, invocations=30,
                                    max_concurrency=3))

    gw = drive(0.02, test)
    seg = out[0]
    assert len(seg.records) == 30 and gw.peak == 3
    assert {(r.clients, r.max_concurrency) for r in seg.records} == {(3, 3)}
    assert len({r.seq for r in seg.records}) == 30
    assert seg.elapsed_s == pytest.approx(10 * 0.02, rel=0.9)  # 30 calls over 3 clients, 20 ms each


def test_closed_loop_stops_at_the_duration() -> None:
    out: list[Segment] = []

    async def test(ctx: SessionContext) -> None:
        out.append(await run_closed(ctx, clients=2, level="c=2", duration_s=0.3, invocations=None))

    drive(0.01, test)
    assert 0.3 <= out[0].elapsed_s < 0.6 and len(out[0].records) >= 10


def test_open_loop_records_the_wait_for_a_free_client() -> None:
    out: list[Segment] = []

    async def test(ctx: SessionContext) -> None:
        # 5 arrivals at once, 1 client, 50 ms each: the k-th waits about k x 50 ms for the client
        out.append(await run_open(ctx, [0.0] * 5, clients=1, level="open"))

    gw = drive(0.05, test)
    records = sorted(out[0].records, key=lambda r: r.t_s)
    assert len(records) == 5 and gw.peak == 1
    waits = [r.client_wait_ms for r in records]
    assert waits[0] < 30 and waits[-1] >= 4 * 45
    assert all(40 <= r.latency_ms < 500 for r in records)  # the wait is not in the latency


def test_warm_up_loads_every_model_once() -> None:
    async def test(ctx: SessionContext) -> None:
        assert await warm_up(ctx, ["a", "b", "c"], parallel=2) == []
        assert ctx.seen == {"a", "b", "c"}

    gw = drive(0.0, test)
    assert gw.loaded == {"a", "b", "c"}
