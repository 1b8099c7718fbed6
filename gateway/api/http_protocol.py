"""uvicorn's httptools protocol with what the gateway adds: two read timeouts, and one write per response.

Read timeouts. uvicorn bounds only the idle time between keep-alive requests. A client that opens a
connection and sends its headers a byte at a time, or stops half-way through a body, holds a connection and
its request task for as long as it likes; a few hundred of them exhaust the server. Here the headers of each
request must arrive within `--header-timeout` of its first byte (or of the connection), and a body may not
stall for longer than `--body-timeout` between two chunks; past either the client gets a 408 and the
connection is closed. The timers are armed and reset per request and per chunk (a timer handle each),
nothing per byte.

One write per response. uvicorn writes a response's head when the app sends `http.response.start` and its
body when the app sends `http.response.body`: two system calls, and two wakeups of the client, for every
answer. Writing to a socket is the largest single cost of the gateway's hop (on a 2-core VM a loopback
write measured tens of microseconds), so each request's cycle writes through `OneWrite`, which holds the
head until the body's first write and sends both together.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_JOIN_BELOW = 1 << 16  # a smaller body is joined to the head; a larger one goes out beside it, not copied

_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s")


class OneWrite:
    """The transport one request-response cycle writes through: the head uvicorn writes at the response's
    start is held and sent with the first body write (or when the response completes, or the connection is
    closed, whichever comes first). Everything else passes straight to the real transport."""

    __slots__ = ("transport", "cycle", "head", "started")

    def __init__(self, transport: Any, cycle: Any) -> None:
        self.transport, self.cycle = transport, cycle
        self.head: bytes | None = None
        self.started = False  # the head has been seen

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


def http_protocol(header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)`: both read bounds, one write per response."""

    class GatewayHttpProtocol(HttpToolsProtocol):
        _read_timer: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float, what: str) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(seconds, self._timed_out, what)

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
            self._arm(header_timeout_s, "headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm(header_timeout_s, "headers")

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and not isinstance(cycle.transport, OneWrite):  # the request's new cycle
                cycle.transport = OneWrite(cycle.transport, cycle)
            if self.cycle is not None and self.cycle.more_body and not self.parser.should_upgrade():
                self._arm(body_timeout_s, "body")
            else:
                self._disarm()

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            self._arm(body_timeout_s, "body")

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            if cycle is not None and isinstance(cycle.transport, OneWrite):
                cycle.transport.flush()  # a response with no body write (HEAD) sends its head now
            super().on_response_complete()

    return GatewayHttpProtocol
