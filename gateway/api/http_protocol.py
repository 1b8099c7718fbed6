"""uvicorn's httptools protocol plus the gateway's read timeouts, one write per response, bodies as they came.

Read timeouts. uvicorn bounds only the idle time between keep-alive requests. A client that opens a
connection and sends its headers a byte at a time, or stops half-way through a body, holds a connection and
its request task for as long as it likes; a few hundred of them exhaust the server. Here the headers of each
request must arrive within `--header-timeout` of its first byte (or of the connection), and a body may not
stall for longer than `--body-timeout` between two chunks; past either the client gets a 408 and the
connection is closed. Parser callbacks only note times; a timer is armed after a read that left a request
incomplete, so a request that arrives whole in one read (nearly all of them) costs no timer at all.

One write per response. uvicorn writes a response's head when the app sends `http.response.start` and its
body when the app sends `http.response.body`: two system calls, and two wakeups of the client, for every
answer. Writing to a socket is the largest single cost of the gateway's hop (on a 2-core VM a loopback
write measured tens of microseconds), so each request's cycle writes through `OneWrite`, which holds the
head until the body's first write and sends both together.

Request bodies as they arrived. uvicorn gathers a body into a bytearray and hands the app a bytes copy of it,
pausing the socket every 64 KiB until the app has taken what came: a 1 MiB tensor is copied twice and
crosses the event loop sixteen times. Here each cycle's body is a `StreamedBody`: the chunks the parser
produced, handed to the app one per `receive()` without a copy, with reading paused only past 4 MiB
buffered on one connection.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_JOIN_BELOW = 1 << 16  # a smaller body is joined to the head; a larger one goes out beside it, not copied
_HIGH_WATER = 1 << 22  # bytes of request body buffered on one connection before reading pauses

_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s")


class OneWrite:
    """The transport one request-response cycle writes through: the head uvicorn writes at the response's
    start is held and sent with the first body write (or when the response completes, or the connection is
    closed, whichever comes first). Everything else passes straight to the real transport."""

    __slots__ = ("transport", "cycle", "head", "started", "on_response")

    def __init__(self, transport: Any, cycle: Any) -> None:
        self.transport, self.cycle = transport, cycle
        self.head: bytes | None = None
        self.started = False  # the head has been seen
        self.on_response = cycle.on_response  # the protocol's callback when this cycle's response is complete

    @classmethod
    def install(cls, cycle: Any) -> None:
        """Make `cycle` write through a OneWrite, which sends a held head when that cycle's response ends
        (a HEAD answer has no body write; with pipelining the protocol's current cycle is another one)."""
        one = cls(cycle.transport, cycle)
        cycle.transport, cycle.on_response = one, one.responded

    def responded(self) -> None:
        self.flush()
        self.on_response()

    def write(self, data: bytes) -> None:
        if not self.started and self.cycle.response_started:  # uvicorn's first write once started: the head
            self.started, self.head = True, data
            return
        head = self.head
        if head is None:
            self.transport.write(data)
            return
        self.head = None
        if len(data) < _JOIN_BELOW:
            self.transport.write(head + data)
        else:
            self.transport.writelines((head, data))

    def flush(self) -> None:
        head, self.head = self.head, None
        if head is not None:
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class StreamedBody:
    """One request's body as the parser delivered it, and the `receive()` the app gets for it (in place of
    uvicorn's, with the same answers: body chunks, then `http.disconnect` once the client has gone or the
    response is complete)."""

    __slots__ = ("cycle", "flow", "parts", "buffered", "ended", "high_water")

    def __init__(self, cycle: Any, flow: Any, high_water: int = _HIGH_WATER) -> None:
        self.cycle, self.flow, self.high_water = cycle, flow, high_water
        self.parts: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.ended = False  # the app has been given the body's last chunk

    def add(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.buffered += len(chunk)
        if self.buffered > self.high_water:
            self.flow.pause_reading()
        self.cycle.message_event.set()

    async def receive(self) -> dict[str, Any]:
        cycle = self.cycle
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while not (cycle.disconnected or cycle.response_complete):
            parts = self.parts
            if parts:
                chunk = parts.popleft()
                self.buffered -= len(chunk)
                if self.buffered <= self.high_water:
                    self.flow.resume_reading()
                more = bool(parts) or cycle.more_body
                self.ended = not more
                return {"type": "http.request", "body": chunk, "more_body": more}
            if not cycle.more_body and not self.ended:  # an empty body, or one already ended by an empty chunk
                self.ended = True
                return {"type": "http.request", "body": b"", "more_body": False}
            self.flow.resume_reading()
            cycle.message_event.clear()  # no await since the checks above: nothing set in between is lost
            await cycle.message_event.wait()
        return {"type": "http.disconnect"}


def http_protocol(header_timeout_s: float, body_timeout_s: float,
                  read_ahead_bytes: int = _HIGH_WATER) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)`: both read bounds, one write per response, bodies as
    they arrived, reading paused past `read_ahead_bytes` of body the app has not taken."""

    class GatewayHttpProtocol(HttpToolsProtocol):
        _read_timer: asyncio.TimerHandle | None = None
        _waiting: str | None = None  # what the connection waits for: "headers", "body", or nothing
        _since = 0.0  # the loop time the request (or the connection) began: the headers' deadline counts from it
        _body_seen = 0.0  # the loop time the last body chunk arrived: the body's deadline counts from it

        def _sync_timer(self) -> None:
            """After each read: a timer while a request is incomplete, none otherwise. A request that arrives
            whole in one read (nearly all of them) never arms one; parser callbacks only note times."""
            if self._waiting is None:
                self._disarm()
            elif self._read_timer is None:
                self._read_timer = self.loop.call_later(self._left(), self._check)

        def _left(self) -> float:
            if self._waiting == "headers":
                return self._since + header_timeout_s - self.loop.time()
            return self._body_seen + body_timeout_s - self.loop.time()

        def _check(self) -> None:
            self._read_timer = None
            if self._waiting is None:
                return
            left = self._left()
            if left > 0:  # progress since the timer was set: wait for the rest of the bound
                self._read_timer = self.loop.call_later(left, self._check)
            else:
                self._timed_out(self._waiting)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self, what: str) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            client = self.client
            log.info("http.read_timeout", extra={"waiting_for": what, "client": f"{client[0]}:{client[1]}"
                                                  if client else "?"})
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                body = b'{"error": "the request was not received in time (%s)", "code": "RequestTimeout"}' % (
                    what.encode())
                self.transport.write(_408 % (len(body), body))
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True  # the app's next receive() says the client went away
                cycle.message_event.set()
            self.transport.close()

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._waiting, self._since = "headers", self.loop.time()
            self._sync_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._waiting = None
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self.transport.is_closing():
                self._sync_timer()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._waiting, self._since = "headers", self.loop.time()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and not isinstance(cycle.transport, OneWrite):  # the request's new cycle
                OneWrite.install(cycle)
                cycle.streamed = StreamedBody(cycle, self.flow, read_ahead_bytes)
                cycle.receive = cycle.streamed.receive  # run_asgi passes self.receive: it starts after this
            if cycle is not None and cycle.more_body and not self.parser.should_upgrade():
                self._waiting, self._body_seen = "body", self.loop.time()
            else:
                self._waiting = None

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if cycle.response_complete or (self.parser.should_upgrade() and self._should_upgrade()):
                return  # answered already (a refusal before the body was read): the rest is dropped
            cycle.streamed.add(body)
            self._body_seen = self.loop.time()

        def on_message_complete(self) -> None:
            self._waiting = None
            super().on_message_complete()

    return GatewayHttpProtocol
