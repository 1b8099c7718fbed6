"""The router's gRPC side, served for real on loopback: a ModelStreamInfer stream that never sends its first
request is ended at the stream bound, with no client deadline needed (before, it waited for ever)."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from gateway.router import grpc as router_grpc
from gateway.router.fleet import Fleet
from gateway.router.metrics import RouterMetrics
from gateway.router.policy import LEAST_OUTSTANDING
from gateway.router.table import RoutingTable
from gateway.triton.grpc import SERVICE


def test_a_stream_without_a_first_request_ends_at_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_grpc, "_STREAM_TIMEOUT_S", 0.5)  # an hour in service

    async def run() -> grpc.StatusCode:
        fleet, metrics = Fleet(), RouterMetrics(LEAST_OUTSTANDING)
        forwarder = router_grpc.GrpcForwarder(RoutingTable(fleet, metrics, LEAST_OUTSTANDING, 8), fleet, metrics,
                                              600.0, 1 << 20)
        port = await forwarder.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                idle = asyncio.Queue[bytes]()  # never given anything: the client sends no request

                async def nothing():  # type: ignore[no-untyped-def]
                    yield await idle.get()

                call = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer")(nothing())  # no deadline
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(call.read(), 20)  # the test's own bound, far past the router's
                return err.value.code()
        finally:
            await forwarder.stop(0)

    assert asyncio.run(run()) is grpc.StatusCode.DEADLINE_EXCEEDED
