"""How the router takes a request body and its routing headers: a repeated routing header is refused, a small
body is buffered whole (and can be resent), a large one streams once, a chunked one stops at the cap, and a
client that leaves mid-body is noticed; a refused connection is retried only while nothing has been sent."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from gateway.router.discovery import Endpoint
from gateway.router.fleet import Fleet, Instance
from gateway.router.http import (BodyStream, BodyTooLarge, ClientGone, HttpForwarder, RepeatedHeader, framing,
                                 read_body, routing_headers_once, target_model)
from gateway.router.metrics import RouterMetrics
from gateway.router.policy import LEAST_OUTSTANDING
from gateway.router.table import ConnectFailed, RoutingTable
from gateway.triton.process import free_port

KIB = 1 << 10


def receiver(*chunks: bytes, gone: bool = False) -> Any:
    """An ASGI receive() that hands over `chunks` as one body, then (with `gone`) a disconnect instead of its end."""
    messages: list[dict[str, Any]] = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    if gone:
        messages.append({"type": "http.disconnect"})
    else:
        messages[-1]["more_body"] = False

    async def receive() -> dict[str, Any]:
        return messages.pop(0)
    return receive


async def drain(stream: BodyStream) -> bytes:
    return b"".join([chunk async for chunk in stream])


def test_a_routing_header_may_come_once_whatever_its_case_or_path() -> None:
    routing_headers_once([(b"x-amzn-sagemaker-target-model", b"a.tar.gz"), (b"accept", b"a"), (b"accept", b"b")])
    with pytest.raises(RepeatedHeader, match="X-Amzn-SageMaker-Target-Model"):
        routing_headers_once([(b"x-amzn-sagemaker-target-model", b"a.tar.gz"),
                              (b"X-Amzn-SageMaker-Target-Model", b"b.tar.gz")])
    with pytest.raises(RepeatedHeader):  # the same value twice too: there is nothing to choose between
        routing_headers_once([(b"x-amzn-sagemaker-target-model", b"a")] * 2)
    assert target_model("/invocations", [(b"x-amzn-sagemaker-target-model", b"")]) == (None, "/invocations")


def test_framing_reads_the_declared_length_and_chunking() -> None:
    assert framing([(b"content-length", b"12")]) == (12, False)
    assert framing([(b"transfer-encoding", b"chunked")]) == (None, True)
    assert framing([(b"content-length", b"-1")]) == (None, False)


def test_a_body_whole_within_64_kib_is_buffered() -> None:
    assert asyncio.run(read_body(receiver(b"ab", b"", b"cd"), 1 << 20)) == b"abcd"
    assert asyncio.run(read_body(receiver(b""), 1 << 20)) == b""
    body = b"x" * (64 * KIB - 1)
    assert asyncio.run(read_body(receiver(body), 1 << 20)) == body


def test_a_larger_body_streams_once_in_order() -> None:
    parts = [bytes([i]) * (40 * KIB) for i in range(5)]

    async def run() -> None:
        stream = await read_body(receiver(*parts), 1 << 20)
        assert isinstance(stream, BodyStream) and not stream.started
        assert await drain(stream) == b"".join(parts)
        assert stream.started and stream.failure is None
        with pytest.raises(RuntimeError, match="once"):
            await drain(stream)
    asyncio.run(run())


def test_a_chunked_body_stops_at_the_cap_before_or_while_streaming() -> None:
    with pytest.raises(BodyTooLarge):
        asyncio.run(read_body(receiver(b"x" * 600, b"x" * 600), 1000))

    async def run() -> BodyStream:
        stream = await read_body(receiver(*[b"x" * (64 * KIB)] * 4), 200 * KIB)
        assert isinstance(stream, BodyStream)
        with pytest.raises(BodyTooLarge):
            await drain(stream)
        return stream
    assert isinstance(asyncio.run(run()).failure, BodyTooLarge)


def test_a_client_that_leaves_mid_body_is_noticed() -> None:
    with pytest.raises(ClientGone):
        asyncio.run(read_body(receiver(b"x", gone=True), 1 << 20))

    async def run() -> BodyStream:
        stream = await read_body(receiver(b"x" * (64 * KIB), b"y", gone=True), 1 << 20)
        assert isinstance(stream, BodyStream)
        with pytest.raises(ClientGone):
            await drain(stream)
        return stream
    assert isinstance(asyncio.run(run()).failure, ClientGone)


def test_a_refused_connection_is_retried_only_while_nothing_of_the_body_was_sent() -> None:
    """Against a real closed port: before a streamed body is read the table may try elsewhere (ConnectFailed);
    once a try has read part of it, the bytes are gone and the failure is final."""
    fleet = Fleet()
    fleet.update([Endpoint("127.0.0.1", free_port(), free_port())])
    instance: Instance = next(iter(fleet.instances.values()))
    metrics = RouterMetrics(LEAST_OUTSTANDING)

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            table = RoutingTable(fleet, metrics, LEAST_OUTSTANDING, 8)
            forwarder = HttpForwarder(table, fleet, metrics, session, 10.0, 1 << 20)
            for small in (b"{}", b""):
                with pytest.raises(ConnectFailed):
                    await forwarder._send(instance, "POST", "/v2/models/m/infer", [], small)
            stream = await read_body(receiver(*[b"x" * (64 * KIB)] * 3), 1 << 20)
            assert isinstance(stream, BodyStream)
            with pytest.raises(ConnectFailed):
                await forwarder._send(instance, "POST", "/v2/models/m/infer", [], stream)
            assert not stream.started  # the refusal came before aiohttp read the body
            iterator = stream.__aiter__()
            await iterator.__anext__()  # as a try that sent its first chunk before its connection broke
            with pytest.raises(aiohttp.ClientConnectionError) as err:
                await forwarder._send(instance, "POST", "/v2/models/m/infer", [], stream)
            assert "cannot be sent again" in str(err.value)
            await iterator.aclose()
    asyncio.run(run())
