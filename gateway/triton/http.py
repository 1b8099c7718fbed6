"""Triton's HTTP data API over pooled keep-alive connections: inference and model resources.

Bodies pass through as bytes: JSON and binary-tensor requests reach Triton unchanged and tensors are never
decoded in the gateway. Callers name the model by its Triton name in the path.

This client is built for that one job. A general client (aiohttp) builds request and response objects,
header multidicts, cookie jars and trace hooks on every call, which measured as most of the gateway's added
latency; here each connection is an asyncio protocol with httptools' response parser (the parser uvicorn
uses on the serving side), a request is one write (its head and body together, or head then body without
joining when the body is large), and only the headers Triton acts on are kept.
"""

from __future__ import annotations

import asyncio
import collections
import re
import ssl
from dataclasses import dataclass
from typing import Mapping, Sequence, Union
from urllib.parse import urlsplit

import httptools

from gateway.errors import InvalidRequest, TritonUnavailable, UpstreamTimeout
from gateway.triton import auth

# Request headers Triton's HTTP API acts on; the rest (cookies, auth for the gateway, ...) stay here.
# No Accept-Encoding: an answer Triton compressed could not have its internal model name taken out of it.
FORWARD_REQUEST = ("content-type", "inference-header-content-length", "content-encoding")
_UNSAFE_PATH = re.compile(r"[\x00-\x20\x7f]")  # a path is written into the request line: no space, CR, LF
_UNSAFE_VALUE = re.compile(r"[\r\n\x00]")
_FORWARD_RESPONSE = frozenset((b"content-type", b"inference-header-content-length", b"content-encoding"))
_CONNECT_TIMEOUT_S = 5.0
_JOIN_BELOW = 1 << 16  # smaller bodies are joined with the head into one write; larger ones are not copied
_IDLE_S = 30.0  # a pooled connection idle for longer is closed rather than reused


Body = Union[bytes, Sequence[bytes]]  # whole, or the parts it arrived in (sent as they are, never joined)


@dataclass(frozen=True)
class Forwarded:
    status: int
    headers: dict[str, str]
    body: bytes


class _ConnectionLost(Exception):
    """The connection closed before a whole answer arrived; `answered` says whether any of it had."""

    def __init__(self, answered: bool, cause: BaseException | None) -> None:
        super().__init__(str(cause) if cause else "connection closed")
        self.answered = answered


class _Connection(asyncio.Protocol):
    """One keep-alive connection to Triton carrying one request at a time; the parser's callbacks fill in
    the answer and complete the waiting future."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Forwarded] | None = None
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.answered = False
        self.reusable = True
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TritonUnavailable(f"Triton sent an answer that is not HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(_ConnectionLost(self.answered, exc))

    # -- httptools callbacks ---------------------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _FORWARD_RESPONSE:
            self.headers[name.decode()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        waiter.set_result(Forwarded(self.parser.get_status_code(), self.headers, body))

    # -- requests --------------------------------------------------------------------------------------------

    def send(self, head: bytes, body: Body | None, length: int) -> asyncio.Future[Forwarded]:
        """Write one request: a small one in one write, a large one's parts as they are (no copy)."""
        assert self.transport is not None
        self.waiter = self.loop.create_future()
        self.headers, self.chunks, self.answered = {}, [], False
        if not body:
            self.transport.write(head)
        elif length >= _JOIN_BELOW:
            self.transport.writelines([head, body] if isinstance(body, bytes) else [head, *body])
        else:
            self.transport.write(head + (body if isinstance(body, bytes) else b"".join(body)))
        return self.waiter

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class TritonHttp:
    """A pool of keep-alive connections to Triton's HTTP endpoint (at most `max_connections` open); every
    request carries the restricted APIs' secret, `api_key`, in the head's fixed lines."""

    def __init__(self, http_url: str, max_connections: int = 256, timeout_s: float = 300.0,
                 api_key: str | None = None) -> None:
        self.base = http_url if "://" in http_url else f"http://{http_url}"
        parts = urlsplit(self.base)
        self.host = parts.hostname or "localhost"
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self._prefix = parts.path.rstrip("/")
        # Host and the secret: the lines every request carries, joined once here.
        self._fixed_lines = f"Host: {parts.netloc}\r\n" + (f"{auth.HEADER}: {api_key}\r\n" if api_key else "")
        self.timeout_s = timeout_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self._slots = asyncio.Semaphore(max_connections)
        self._open: set[_Connection] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        # The loop is looked up once: on Python 3.11 each asyncio.get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        self._open.clear()

    async def request(
        self, method: str, path: str, body: Body | None = None, headers: Mapping[str, str] | None = None
    ) -> Forwarded:
        """Send `method path` to Triton and return its answer whole. A reused connection that turns out to
        have been closed by Triton before answering is replaced once; nothing that Triton began to answer
        is ever sent twice."""
        length = 0 if body is None else len(body) if isinstance(body, bytes) else sum(map(len, body))
        head = self._head(method, path, length if body is not None or method in ("POST", "PUT") else None, headers)
        loop = self._loop or asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        for attempt in (1, 2):
            await self._slots.acquire()
            conn: _Connection | None = None
            try:
                conn, reused = await self._connection(loop, method, path)
                waiter = conn.send(head, body, length)
                timer = loop.call_at(deadline, _expire, waiter)
                try:
                    answer = await waiter
                finally:
                    timer.cancel()
            except _ConnectionLost as exc:
                self._discard(conn)
                if reused and not exc.answered and attempt == 1:
                    continue
                raise TritonUnavailable(f"Triton at {self.base} closed the connection during {method} {path}: "
                                        f"{exc}") from None
            except asyncio.TimeoutError:
                self._discard(conn, abort=True)
                raise UpstreamTimeout(f"Triton did not answer {method} {path} within {self.timeout_s:.0f}s "
                                      "(--infer-timeout)") from None
            except BaseException:  # cancelled mid-request: the connection's state is unknown
                self._discard(conn, abort=True)
                raise
            finally:
                self._slots.release()
            if conn.reusable and not self._closed:
                conn.idle_since = loop.time()
                self._idle.append(conn)
            else:
                self._discard(conn)
            return answer
        raise AssertionError("unreachable")

    # -- the parts ---------------------------------------------------------------------------------------------

    def _head(self, method: str, path: str, length: int | None, headers: Mapping[str, str] | None) -> bytes:
        """The request's head; what could split it (a space or CR/LF in the path, CR/LF in a value) is refused
        here too, whatever the caller checked: one bad request must not inject into a pooled connection."""
        if _UNSAFE_PATH.search(path):
            raise InvalidRequest(f"the path {path[:80]!r} holds a space or control character")
        lines = [f"{method} {self._prefix}{path} HTTP/1.1\r\n", self._fixed_lines]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        if headers:
            for name, value in headers.items():
                if name.lower() in FORWARD_REQUEST:
                    if _UNSAFE_VALUE.search(value):
                        raise InvalidRequest(f"header {name} holds a CR, LF or NUL")
                    lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def _connection(self, loop: asyncio.AbstractEventLoop, method: str,
                          path: str) -> tuple[_Connection, bool]:
        """An idle pooled connection (True: reused), or a new one (False)."""
        idle, now = self._idle, loop.time()
        while idle and now - idle[0].idle_since >= _IDLE_S:  # the oldest idle ones: closed, not kept forever
            self._discard(idle.popleft())
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed
            if not conn.closed and now - conn.idle_since < _IDLE_S:
                return conn, True
            self._discard(conn)
        if self._closed:
            raise TritonUnavailable("the gateway is stopping")
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(loop), self.host, self.port, ssl=ssl.create_default_context() if self.tls else None),
                timeout=_CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise TritonUnavailable(f"Triton at {self.base} did not answer {method} {path}: "
                                    f"{exc or type(exc).__name__}") from None
        self._open.add(conn)
        return conn, False

    def _discard(self, conn: _Connection | None, abort: bool = False) -> None:
        if conn is None:
            return
        self._open.discard(conn)
        conn.abort() if abort else conn.close()


def _expire(waiter: asyncio.Future[Forwarded]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())
