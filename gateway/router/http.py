"""The router's HTTP side in raw ASGI: answers health and /metrics itself, forwards everything else as bytes.

The TargetModel is read from the path (`/v2/models/{m}/...`, `/v2/repository/models/{m}/...`,
`/models/{m}/...`) or from SageMaker's `X-Amzn-SageMaker-Target-Model` header, which must come once: a
repeated one is a 400 naming it, since the gateway reads one of the values and routing by another would send
the request to an instance chosen for a model it does not name. Requests that name no model go to any
healthy instance. The client's method, raw path, query, headers (Authorization and Host included, as sent:
SigV4 signs Host; repeated ones kept) and body go upstream unchanged, minus hop-by-hop headers; the
instance's status, headers and body come back the same way.

Bodies. The router serves through the gateway's HTTP protocol (`gateway.api.http_protocol`: headers and
stalled bodies cut off with a 408, body chunks handed over as they arrive). A body over
`--max-request-bytes` is refused from its Content-Length before a byte of it is read, a chunked one as soon
as it passes the cap. A body that is whole within its first 64 KiB (nearly every request) is sent upstream
as one buffer, and may be sent again to a second instance when the first refuses the connection. A larger
one is streamed: its chunks go upstream as they come, so an upload that stalls holds an upstream connection
until `--body-timeout`, never its bytes. It goes to a second instance only when the first refused the
connection before a byte of it was read; once part of it is sent it cannot be sent again, and a connection
lost then is a 502.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp

from gateway.router.fleet import Fleet, Instance
from gateway.router.metrics import RouterMetrics
from gateway.router.table import ConnectFailed, NoInstance, RoutingTable

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, body

TARGET_HEADER = b"x-amzn-sagemaker-target-model"
# The headers the router routes on (each may come once), with the names an error message gives them.
ROUTING_HEADERS = {TARGET_HEADER: "X-Amzn-SageMaker-Target-Model"}
# RFC 9110 7.6.1, plus the framing aiohttp writes again for what it sends (a streamed body's Content-Length
# is put back: SigV4 may have signed it), and `Expect`: the protocol answered the client's 100-continue.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
               b"transfer-encoding", b"upgrade", b"content-length", b"expect"}
_RESEND_BELOW = 1 << 16  # a body whole within this many bytes is buffered (and can be resent); larger, streamed
_MODEL_SUFFIXES = ("/infer", "/ready", "/config", "/stats", "/load", "/unload", "/invoke")
_LEARNS = ("/infer", "/config", "/stats", "/load", "/invoke", "/invocations", "")  # answers that mean "loaded"


class RepeatedHeader(ValueError):
    """A header the router routes on came more than once (400)."""


class ClientGone(Exception):
    """The client left, or stalled past `--body-timeout` (the protocol answered 408), before its body ended."""


class BodyTooLarge(Exception):
    """A chunked body passed `--max-request-bytes` (413)."""


def routing_headers_once(headers: list[tuple[bytes, bytes]]) -> None:
    """RepeatedHeader when a header in ROUTING_HEADERS comes more than once, whatever the path."""
    seen: set[bytes] = set()
    for key, _ in headers:
        name = key.lower()
        if name in ROUTING_HEADERS:
            if name in seen:
                raise RepeatedHeader(f"the {ROUTING_HEADERS[name]} header came more than once; send it once")
            seen.add(name)


def target_model(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """(TargetModel or None, the path's verb: '/infer', '/ready', '', '/invocations', ...). The header is
    assumed to come at most once (`routing_headers_once`)."""
    for prefix in ("/v2/models/", "/v2/repository/models/", "/models/"):
        if path.startswith(prefix):
            rest = path[len(prefix):]
            verb = next((s for s in _MODEL_SUFFIXES if rest.endswith(s)), "")
            rest = rest[: len(rest) - len(verb)]
            head, sep, version = rest.rpartition("/versions/")
            if sep and head and version and "/" not in version:
                rest = head
            return (rest or None), verb
    if path == "/invocations" or (path.startswith("/endpoints/") and path.endswith("/invocations")):
        for key, value in headers:
            if key.lower() == TARGET_HEADER:
                return value.decode("latin-1") or None, "/invocations"
        return None, "/invocations"
    return None, ""


def protocol_of(path: str) -> str:
    if path.startswith("/v2"):
        return "kserve_http"
    return "sagemaker_runtime" if path.endswith("/invocations") else "other"


class HttpForwarder:
    """The ASGI app; `session` is the router's one aiohttp session (a connection pool per instance)."""

    def __init__(self, table: RoutingTable, fleet: Fleet, metrics: RouterMetrics, session: aiohttp.ClientSession,
                 timeout_s: float, max_body_bytes: int) -> None:
        """`timeout_s` bounds one forwarded request, its streamed upload included."""
        self.table = table
        self.fleet = fleet
        self.metrics = metrics
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path in ("/v2/health/live", "/v2/health/ready", "/ping", "/metrics"):
            return await self._local(path, send)
        started = time.perf_counter()
        protocol = protocol_of(path)
        try:  # every header check before a byte of the body is read
            routing_headers_once(scope["headers"])
            model, verb = target_model(path, scope["headers"])
        except RepeatedHeader as exc:
            return await self._refuse(send, protocol, 400, "InvalidRequest", str(exc))
        length, chunked = framing(scope["headers"])
        if length is not None and length > self.max_body_bytes:
            return await self._refuse(send, protocol, 413, "RequestTooLarge", self._too_large(length))
        try:
            body = await read_body(receive, self.max_body_bytes)
        except ClientGone:
            self.metrics.errors.labels("client_gone").inc()
            return
        except BodyTooLarge:
            return await self._refuse(send, protocol, 413, "RequestTooLarge", self._too_large(None), close=True)
        unload = verb == "/unload" and model is not None
        if unload and isinstance(body, BodyStream):  # sent to every instance at once: it must be resendable
            return await self._refuse(send, protocol, 413, "RequestTooLarge",
                                      f"an unload's body must be under {_RESEND_BELOW} bytes")
        target = scope.get("raw_path") or path.encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.lower() not in _HOP_BY_HOP]
        if isinstance(body, BodyStream) and length is not None and not chunked:
            headers.append(("Content-Length", str(length)))  # as the client sent it, not chunked upstream

        async def attempt(instance: Instance) -> Answer:
            return await self._send(instance, method, target.decode("latin-1"), headers, body)

        try:
            if unload:
                assert model is not None
                instance, (status, out_headers, out_body) = await self._unload_everywhere(model, attempt)
            else:
                instance, (status, out_headers, out_body) = await self.table.forward(model, attempt)
        except ClientGone:  # the protocol has answered 408 or the client is gone: nobody to answer
            self.metrics.errors.labels("client_gone").inc()
            return
        except BodyTooLarge:
            return await self._refuse(send, protocol, 413, "RequestTooLarge", self._too_large(None), close=True)
        except NoInstance as exc:
            self.metrics.errors.labels("no_instance").inc()
            status, out_headers, out_body = _error(503, "NoHealthyInstance", str(exc))
        except asyncio.TimeoutError:
            self.metrics.errors.labels("timeout").inc()
            status, out_headers, out_body = _error(504, "UpstreamTimeout", f"no answer for {model or path} in time")
        except (aiohttp.ClientError, OSError) as exc:
            self.metrics.errors.labels("upstream").inc()
            log.warning("router.upstream_error", extra={"path": path, "model": model, "error": repr(exc)})
            status, out_headers, out_body = _error(
                502, "UpstreamConnectionLost", f"the instance serving {model or path} dropped the connection")
        else:
            if status == 200 and verb in _LEARNS:
                self.table.learned(instance, model)
        self.metrics.requests.labels(protocol, str(status)).inc()
        self.metrics.latency.labels(protocol).observe(time.perf_counter() - started)
        await _answer(send, status, out_headers, out_body)

    async def _unload_everywhere(self, model: str, attempt: Callable[[Instance], Awaitable[Answer]]
                                 ) -> tuple[Instance, Answer]:
        """Every copy goes: the unload is sent to every healthy instance. The answer is the first error other
        than 404 (an instance that never saw the model), else a success, else a 404."""
        results = await self.table.broadcast(attempt)
        for instance, result in results:
            if isinstance(result, Exception) and not isinstance(result, ConnectFailed):
                raise result
        answers = [(i, r) for i, r in results if not isinstance(r, BaseException)]
        if not answers:
            raise NoInstance(f"no gateway instance took the unload of {model}")
        for instance, answer in answers:
            if answer[0] == 200:
                self.table.forgot(instance, model)
        ranked = sorted(answers, key=lambda a: 0 if a[1][0] not in (200, 404) else 1 if a[1][0] == 200 else 2)
        return ranked[0]

    async def _send(self, instance: Instance, method: str, target: str, headers: list[tuple[str, str]],
                    body: bytes | BodyStream) -> Answer:
        """One try on `instance`. ConnectFailed (the table tries another instance) only when nothing of the
        request was sent; a streamed body that stopped short raises why (ClientGone, BodyTooLarge)."""
        stream = body if isinstance(body, BodyStream) else None
        try:
            async with self.session.request(
                method, instance.http_base + target, data=body, headers=headers, timeout=self.timeout,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"), allow_redirects=False,
            ) as resp:
                payload = await resp.read()
                raw = [(k, v) for k, v in resp.raw_headers if k.lower() not in _HOP_BY_HOP]
                return resp.status, raw, payload
        except aiohttp.ClientConnectorError as exc:  # refused, unreachable: nothing of this try was sent
            if stream is not None and stream.started:  # an earlier try read part of the body: it is gone
                raise aiohttp.ClientConnectionError(f"{exc}; the request body cannot be sent again") from exc
            raise ConnectFailed(str(exc)) from exc
        except Exception:
            if stream is not None and stream.failure is not None:
                raise stream.failure from None
            raise

    def _too_large(self, length: int | None) -> str:
        size = "the request body" if length is None else f"the request body ({length} bytes)"
        return f"{size} is over the router's limit of {self.max_body_bytes} bytes"

    async def _refuse(self, send: Send, protocol: str, status: int, code: str, message: str,
                      close: bool = False) -> None:
        """An answer of the router's own, not an instance's; `close` ends the connection (the rest of a
        chunked body past the cap is not read)."""
        self.metrics.requests.labels(protocol, str(status)).inc()
        status, headers, body = _error(status, code, message)
        if close:
            headers.append((b"connection", b"close"))
        await _answer(send, status, headers, body)

    async def _local(self, path: str, send: Send) -> None:
        if path == "/metrics":
            status, headers, body = 200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], \
                self.metrics.render()
        elif path == "/v2/health/live":
            status, headers, body = 200, [], b""
        elif self.fleet.healthy():
            status, headers, body = 200, [], b""
        else:
            status, headers, body = _error(503, "NoHealthyInstance", self.fleet.unavailable_reason())
        await _answer(send, status, headers, body)


async def _answer(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def framing(headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """(the declared Content-Length or None, whether the body is chunked), as the parser framed it."""
    length, chunked = None, False
    for key, value in headers:
        name = key.lower()
        if name == b"content-length" and value.isdigit():
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


async def read_body(receive: Receive, cap: int) -> bytes | BodyStream:
    """The body, whole, when it ends within its first `_RESEND_BELOW` bytes; otherwise a BodyStream holding
    what came so far and reading the rest as it is sent upstream. ClientGone, or BodyTooLarge past `cap`."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise BodyTooLarge()
        if chunk:
            parts.append(chunk)
        if not message.get("more_body"):
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if size >= _RESEND_BELOW:
            return BodyStream(receive, cap, parts, size)


class BodyStream:
    """A large body on its way upstream: aiohttp iterates it (an async iterable is what it streams), and each
    chunk is read from the client only when the one before has been written, so the router holds no more of
    it than the protocol's read buffer. It can be sent once: `started` says whether a try has begun reading
    it, `failure` why it stopped short (the exception the forwarder answers for, whatever aiohttp made of it)."""

    def __init__(self, receive: Receive, cap: int, parts: list[bytes], size: int) -> None:
        self._receive = receive
        self._cap = cap
        self._parts = parts  # what was read before the instance was chosen
        self._size = size
        self.started = False
        self.failure: ClientGone | BodyTooLarge | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.started:
            raise RuntimeError("a streamed request body can be sent once")
        self.started = True
        parts, self._parts = self._parts, []
        parts.reverse()
        while parts:
            yield parts.pop()
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                self.failure = ClientGone()
                raise self.failure
            chunk = message.get("body", b"")
            self._size += len(chunk)
            if self._size > self._cap:
                self.failure = BodyTooLarge()
                raise self.failure
            if chunk:
                yield chunk
            if not message.get("more_body"):
                return


def _error(status: int, code: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The gateway's error shape (`{"error", "code"}`); 503 says when to retry, as the gateway's do."""
    headers = [(b"content-type", b"application/json"), (b"x-amzn-errortype", code.encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return status, headers, json.dumps({"error": message, "code": code}).encode()
