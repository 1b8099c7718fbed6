"""The invocation client against small real HTTP servers: routes, CSV fallback, error classes, timeouts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Awaitable, Callable

from aiohttp import web

from mme_bench.client import Invoker, classify
from mme_bench.config import PayloadConfig
from mme_bench.workload import make_payload
from gateway.triton.process import free_port

CFG = PayloadConfig(examples=({"Body": "1"},))
CSV = make_payload(0, {"Body": "1994,3188,5,1.5,1.62,3", "ContentType": "text/csv"}, CFG)
V2 = make_payload(1, {"Body": json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                                       "data": [1, 2, 3, 4, 5, 6]}]}),
                      "ContentType": "application/json"}, CFG)
OK = {"outputs": [{"name": "price", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}


def serve(csv_ok: bool, hits: Counter) -> web.Application:
    """A stand-in gateway: /invocations with or without CSV support, /v2 infer, and error models."""
    async def invocations(request: web.Request) -> web.Response:
        hits["invocations"] += 1
        key = request.headers.get("X-Amzn-SageMaker-Target-Model", "")
        if key == "missing.tar.gz":
            return web.json_response({"error": "no such model", "code": "ModelNotFound"}, status=404)
        if request.content_type == "text/csv" and not csv_ok:
            await asyncio.sleep(0.05)
            return web.json_response({"error": "failed to parse the request JSON buffer"}, status=500)
        return web.json_response(OK)

    async def infer(request: web.Request) -> web.Response:
        hits["v2"] += 1
        body = await request.json()
        assert body["inputs"][0]["name"] == "features"
        model = request.match_info["model"]
        if model == "throttled.tar.gz":
            return web.json_response({"error": "busy", "code": "ThrottlingException"}, status=429)
        if model == "loading.tar.gz":
            return web.json_response({"error": "still loading", "code": "ModelNotReady"}, status=503)
        if model == "triton-down.tar.gz":
            return web.json_response({"error": "triton", "code": "TritonUnavailable"}, status=503)
        if model == "slow.tar.gz":
            await asyncio.sleep(2)
        return web.json_response(OK)

    app = web.Application()
    app.router.add_post("/invocations", invocations)
    app.router.add_post("/v2/models/{model:.+}/infer", infer)
    return app


def with_server(csv_ok: bool, test: Callable[[str, Counter], Awaitable[None]]) -> Counter:
    hits: Counter = Counter()

    async def main() -> None:
        runner = web.AppRunner(serve(csv_ok, hits))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await test(f"http://127.0.0.1:{port}", hits)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return hits


def test_classify() -> None:
    assert classify(200) == "ok" and classify(204) == "ok"
    assert classify(429, "ThrottlingException") == "throttle"
    assert classify(503, "ModelNotReady") == "not_ready"
    assert classify(503, "TritonUnavailable") == "5xx" and classify(507) == "5xx"
    assert classify(404, "ModelNotFound") == "4xx" and classify(422) == "4xx"
    assert classify(None, failure="timeout") == "timeout" and classify(None) == "connection"


def test_csv_falls_back_to_v2_once_and_keeps_the_cold_call_whole() -> None:
    async def test(url: str, hits: Counter) -> None:
        async with Invoker(url, timeout_s=5, connect_timeout_s=2) as inv:
            first = await inv.invoke("a.tar.gz", CSV)
            assert first.error_class == "ok" and first.route == "v2" and first.fallback
            assert first.latency_ms >= 50  # includes the rejected /invocations attempt
            assert inv.csv_route == "v2" and "HTTP 500" in (inv.fallback_reason or "")
            second = await inv.invoke("a.tar.gz", CSV)
            assert second.route == "v2" and not second.fallback
            assert (await inv.invoke("a.tar.gz", V2)).route == "v2"

    hits = with_server(csv_ok=False, test=test)
    assert hits["invocations"] == 1 and hits["v2"] == 3


def test_csv_stays_on_invocations_when_the_gateway_speaks_csv() -> None:
    async def test(url: str, hits: Counter) -> None:
        async with Invoker(url, timeout_s=5, connect_timeout_s=2) as inv:
            for _ in range(3):
                outcome = await inv.invoke("a.tar.gz", CSV)
                assert outcome.error_class == "ok" and outcome.route == "sagemaker" and not outcome.fallback
            assert inv.csv_route == "sagemaker" and inv.fallback_reason is None

    hits = with_server(csv_ok=True, test=test)
    assert hits["invocations"] == 3 and hits["v2"] == 0


def test_an_unknown_model_is_not_mistaken_for_missing_csv_support() -> None:
    async def test(url: str, hits: Counter) -> None:
        async with Invoker(url, timeout_s=5, connect_timeout_s=2) as inv:
            outcome = await inv.invoke("missing.tar.gz", CSV)
            assert (outcome.status, outcome.code, outcome.error_class) == (404, "ModelNotFound", "4xx")
            assert not outcome.fallback and inv.csv_route is None

    assert with_server(csv_ok=False, test=test)["v2"] == 0


def test_error_classes_over_http_and_bounded_timeouts() -> None:
    async def test(url: str, hits: Counter) -> None:
        async with Invoker(url, timeout_s=0.5, connect_timeout_s=0.5, route="v2") as inv:
            assert (await inv.invoke("throttled.tar.gz", V2)).error_class == "throttle"
            not_ready = await inv.invoke("loading.tar.gz", V2)
            assert (not_ready.status, not_ready.code, not_ready.error_class) == (503, "ModelNotReady", "not_ready")
            assert (await inv.invoke("triton-down.tar.gz", V2)).error_class == "5xx"
            slow = await inv.invoke("slow.tar.gz", V2)
            assert slow.error_class == "timeout" and slow.status is None and 400 <= slow.latency_ms < 1500
        async with Invoker(f"http://127.0.0.1:{free_port()}", timeout_s=1, connect_timeout_s=0.5) as dead:
            assert (await dead.invoke("a.tar.gz", V2)).error_class == "connection"

    with_server(csv_ok=True, test=test)
