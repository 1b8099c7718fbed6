"""The router's HTTP side in raw ASGI: answers health and /metrics itself, forwards everything else as bytes.

The TargetModel is read from the path (`/v2/models/{m}/...`, `/v2/repository/models/{m}/...`,
`/models/{m}/...`) or from SageMaker's `X-Amzn-SageMaker-Target-Model` header; requests that name no model
go to any healthy instance. The client's method, raw path, query, headers (Authorization and Host included,
as sent: SigV4 signs Host) and body go upstream unchanged, minus hop-by-hop headers; the instance's status,
headers and body come back the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Awaitable, Callable

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
# RFC 9110 7.6.1, plus the length aiohttp computes again for the bytes it sends, and `Expect`: the router
# has already read the whole body (uvicorn answered the client's 100-continue).
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
               b"transfer-encoding", b"upgrade", b"content-length", b"expect"}
_MODEL_SUFFIXES = ("/infer", "/ready", "/config", "/stats", "/load", "/unload", "/invoke")
_LEARNS = ("/infer", "/config", "/stats", "/load", "/invoke", "/invocations", "")  # answers that mean "loaded"


def target_model(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """(TargetModel or None, the path's verb: '/infer', '/ready', '', '/invocations', ...)."""
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
                return value.decode("latin-1"), "/invocations"
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
        body = await _read_body(receive, scope["headers"], self.max_body_bytes)
        if body is None:
            self.metrics.requests.labels(protocol, "413").inc()
            return await _answer(send, *_error(413, "RequestTooLarge",
                                               f"request body over {self.max_body_bytes} bytes"))
        model, verb = target_model(path, scope["headers"])
        target = scope.get("raw_path") or path.encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]

        async def attempt(instance: Instance) -> Answer:
            return await self._send(instance, method, target.decode("latin-1"), headers, body)

        try:
            if verb == "/unload" and model is not None:
                instance, (status, out_headers, out_body) = await self._unload_everywhere(model, attempt)
            else:
                instance, (status, out_headers, out_body) = await self.table.forward(model, attempt)
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

    async def _send(self, instance: Instance, method: str, target: str, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        upstream = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        try:
            async with self.session.request(
                method, instance.http_base + target, data=body, headers=upstream, timeout=self.timeout,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"), allow_redirects=False,
            ) as resp:
                payload = await resp.read()
                raw = [(k, v) for k, v in resp.raw_headers if k.lower() not in _HOP_BY_HOP]
                return resp.status, raw, payload
        except aiohttp.ClientConnectorError as exc:  # refused, unreachable: nothing was sent
            raise ConnectFailed(str(exc)) from exc

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


async def _read_body(receive: Receive, headers: list[tuple[bytes, bytes]], cap: int) -> bytes | None:
    """The whole body, or None once it is over `cap` bytes (from Content-Length before reading, if sent)."""
    for key, value in headers:
        if key.lower() == b"content-length" and value.isdigit() and int(value) > cap:
            return None
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _error(status: int, code: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The gateway's error shape (`{"error", "code"}`); 503 says when to retry, as the gateway's do."""
    headers = [(b"content-type", b"application/json"), (b"x-amzn-errortype", code.encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return status, headers, json.dumps({"error": message, "code": code}).encode()
