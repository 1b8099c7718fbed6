"""uvicorn's httptools protocol with the two read timeouts it lacks: headers, and a stalled body.

uvicorn bounds only the idle time between keep-alive requests. A client that opens a connection and sends
its headers a byte at a time, or stops half-way through a body, holds a connection and its request task for
as long as it likes; a few hundred of them exhaust the server. Here the headers of each request must arrive
within `--header-timeout` of its first byte (or of the connection), and a body may not stall for longer than
`--body-timeout` between two chunks; past either the client gets a 408 and the connection is closed.
The timers are armed and reset per request and per chunk (a timer handle each), nothing per byte.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s")


def protocol_with_timeouts(header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """A protocol class for `uvicorn.Config(http=...)` enforcing both bounds."""

    class TimedHttpToolsProtocol(HttpToolsProtocol):
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

    return TimedHttpToolsProtocol
