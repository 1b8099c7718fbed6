"""The forwarding HTTP client against real sockets: servers on loopback that misbehave the ways upstreams do
(closing a kept-alive connection, answering slowly, in chunks, or not at all)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from gateway.errors import TritonUnavailable, UpstreamTimeout
from gateway.triton.http import TritonHttp

def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """An async test run on its own event loop."""
    @functools.wraps(test)
    def wrapper() -> None:
        asyncio.run(test())
    return wrapper


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes] | None:
    """One request's request line, headers and body; None when the client closed the connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    line, *rest = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(b":", 1) for h in rest)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


class Upstream:
    """A loopback HTTP server; `handler(reader, writer, n)` serves the n-th request of a connection and says
    whether to keep the connection open. Counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                n += 1
                if not await self.handler(reader, writer, n):
                    break
        finally:
            writer.close()


def answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body))


async def reply(writer: asyncio.StreamWriter, body: bytes = b"{}") -> bool:
    """Answer `body` and keep the connection open."""
    writer.write(answer(body))
    await writer.drain()
    return True


async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
    return await reply(writer, b'{"ok":true}')


@run
async def test_keeps_connections_alive_and_forwards_only_tritons_headers() -> None:
    upstream = Upstream(ok)
    async with upstream as address:
        client = TritonHttp(address)
        await client.start()
        for _ in range(5):
            got = await client.request("POST", "/v2/models/m/infer", b'{"inputs":[]}',
                                       {"Content-Type": "application/json", "Authorization": "Bearer secret",
                                        "Cookie": "a=b"})
            assert (got.status, got.body, got.headers) == (200, b'{"ok":true}', {"content-type": "application/json"})
        await client.close()
    assert upstream.connections == 1  # one connection, kept alive for all five
    line, headers, body = upstream.requests[0]
    assert line == b"POST /v2/models/m/infer HTTP/1.1"
    assert body == b'{"inputs":[]}'
    assert b"authorization" not in headers and b"cookie" not in headers
    assert headers[b"content-type"] == b"application/json"


@run
async def test_a_body_in_parts_arrives_whole_and_in_order() -> None:
    parts = [bytes([i]) * (1 << 20) for i in range(16)]  # 16 MiB in 1 MiB parts, each byte value its own
    seen: list[bytes] = []

    async def digest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        body = upstream.requests[-1][2]
        seen.append(hashlib.sha256(body).digest())
        return await reply(writer, str(len(body)).encode())

    upstream = Upstream(digest)
    async with upstream as address:
        client = TritonHttp(address)
        await client.start()
        got = await client.request("POST", "/x", parts, {"content-type": "application/octet-stream"})
        small = await client.request("POST", "/x", [b"ab", b"cd"])  # small parts go out in one write
        await client.close()
    assert got.body == str(16 << 20).encode()
    assert seen[0] == hashlib.sha256(b"".join(parts)).digest()
    assert small.body == b"4" and upstream.requests[-1][2] == b"abcd"


@run
async def test_a_kept_alive_connection_the_upstream_closed_is_replaced_once() -> None:
    """The upstream reads the second request on a connection and closes without a word: the client resends it
    on a fresh connection, since nothing of it was answered."""
    async def once_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if n > 1:
            return False
        return await reply(writer)

    upstream = Upstream(once_per_connection)
    async with upstream as address:
        client = TritonHttp(address)
        await client.start()
        assert (await client.request("GET", "/v2/models/m")).status == 200
        assert (await client.request("GET", "/v2/models/m")).status == 200
        await client.close()
    assert upstream.connections == 2 and len(upstream.requests) == 3


@run
async def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_retry_loop() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        return False

    upstream = Upstream(hang_up)
    async with upstream as address:
        client = TritonHttp(address)
        await client.start()
        with pytest.raises(TritonUnavailable, match="closed the connection"):
            await client.request("POST", "/v2/models/m/infer", b"{}")
        await client.close()
    assert len(upstream.requests) == 1  # a fresh connection's request is never sent twice


@run
async def test_a_silent_upstream_times_out_and_its_connection_is_not_reused() -> None:
    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        if len(upstream.requests) == 1:
            await asyncio.sleep(5)
        return await reply(writer)

    upstream = Upstream(slow_first)
    async with upstream as address:
        client = TritonHttp(address, timeout_s=0.3)
        await client.start()
        with pytest.raises(UpstreamTimeout):
            await client.request("POST", "/v2/models/m/infer", b"{}")
        assert (await client.request("POST", "/v2/models/m/infer", b"{}")).status == 200  # on a new connection
        await client.close()
    assert upstream.connections == 2


@run
async def test_chunked_answers_and_connection_close_are_honoured() -> None:
    async def chunked_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
                     b"connection: close\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n")
        await writer.drain()
        return False

    upstream = Upstream(chunked_then_close)
    async with upstream as address:
        client = TritonHttp(address)
        await client.start()
        for _ in range(2):
            got = await client.request("GET", "/v2/models/m")
            assert got.body == b'{"a":1}'
        await client.close()
    assert upstream.connections == 2  # "connection: close" was not pooled


@run
async def test_nothing_listening_is_triton_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = TritonHttp(f"127.0.0.1:{port}")
    await client.start()
    with pytest.raises(TritonUnavailable, match="did not answer"):
        await client.request("GET", "/v2/health/ready")


@run
async def test_a_cancelled_request_leaves_the_pool_usable() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> bool:
        await asyncio.sleep(0.5 if len(upstream.requests) == 1 else 0)
        return await reply(writer)

    upstream = Upstream(slow)
    async with upstream as address:
        client = TritonHttp(address)
        await client.start()
        task = asyncio.ensure_future(client.request("POST", "/v2/models/m/infer", b"{}"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        got = await client.request("POST", "/v2/models/m/infer", b"{}")
        await client.close()
    assert got.status == 200  # not the cancelled request's late answer, on a connection of its own
    assert upstream.connections == 2
