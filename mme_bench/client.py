"""One invocation against a gateway: which route, how long it took, and how it ended.

Routes: SageMaker's `POST /invocations` with `X-Amzn-SageMaker-Target-Model` (the body as given, e.g. CSV)
and KServe v2's `POST /v2/models/{key}/infer` (JSON). With route `auto`, CSV examples try /invocations
first; if the gateway answers in a way that says "I don't understand this body" (anything but success,
throttling, not-ready, unknown model or out of memory), the same invocation is sent again as v2 JSON and,
once that works, every later CSV invocation goes straight to v2. The fallback invocation's latency
includes both attempts, so a cold start on the first call is never hidden by the retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote

import aiohttp

from mme_bench.workload import Payload

log = logging.getLogger(__name__)

TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"
ErrorClass = Literal["ok", "throttle", "not_ready", "4xx", "5xx", "timeout", "connection"]
ERROR_CLASSES: tuple[str, ...] = ("throttle", "not_ready", "4xx", "5xx", "timeout", "connection")


def classify(status: int | None, code: str | None = None, failure: str | None = None) -> ErrorClass:
    """The class an outcome counts under: 429 is a throttle, 503 ModelNotReady is not-ready, the rest by
    status class; no status at all is a client-side timeout or connection failure."""
    if status is None:
        return "timeout" if failure == "timeout" else "connection"
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "throttle"
    if status == 503 and code == "ModelNotReady":
        return "not_ready"
    if 400 <= status < 500:
        return "4xx"
    return "5xx"


def _keeps_route(status: int | None, code: str | None) -> bool:
    """Answers that are about the model or the load, not about the body's format: no fallback on these."""
    if status is None or 200 <= status < 300 or status in (429, 503, 507):
        return True
    return status == 404 and code == "ModelNotFound"


@dataclass
class Outcome:
    """What one invocation came to, as the raw results record it."""

    route: str
    status: int | None
    code: str | None
    error_class: ErrorClass
    latency_ms: float
    detail: str = ""
    fallback: bool = False


class Invoker:
    """Sends invocations over one pooled aiohttp session; the route decision is shared by all its callers."""

    def __init__(self, base_url: str, timeout_s: float, connect_timeout_s: float, route: str = "auto",
                 pool_size: int = 64) -> None:
        self.base_url = base_url.rstrip("/")
        self.route_mode = route
        self.csv_route: str | None = {"auto": None, "sagemaker": "sagemaker", "v2": "v2"}[route]
        self.fallback_reason: str | None = None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Invoker":
        connector = aiohttp.TCPConnector(limit=self._pool_size, force_close=False, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              auto_decompress=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def invoke(self, key: str, payload: Payload) -> Outcome:
        """Send `payload` to model `key` on the route the payload and the gateway call for."""
        if payload.v2_body is None:
            return await self._send("sagemaker", key, payload)
        if not payload.is_csv:
            return await self._send("v2", key, payload)
        if self.csv_route is not None:
            return await self._send(self.csv_route, key, payload)
        first = await self._send("sagemaker", key, payload)
        if first.error_class == "ok":
            self.csv_route = "sagemaker"
            return first
        if _keeps_route(first.status, first.code):
            return first
        second = await self._send("v2", key, payload)
        second.latency_ms += first.latency_ms
        second.fallback = True
        if second.error_class == "ok" and self.csv_route is None:
            self.csv_route = "v2"
            self.fallback_reason = f"/invocations answered HTTP {first.status} to a CSV body: {first.detail[:160]}"
            log.warning("bench.csv_fallback", extra={"url": self.base_url, "reason": self.fallback_reason,
                                                     "now_using": "KServe v2 JSON converted from CSV"})
        return second

    async def _send(self, route: str, key: str, payload: Payload) -> Outcome:
        assert self._session is not None, "use Invoker as an async context manager"
        if route == "sagemaker":
            url = f"{self.base_url}/invocations"
            headers = {TARGET_MODEL_HEADER: key, "Content-Type": payload.content_type}
            body = payload.body
        else:
            url = f"{self.base_url}/v2/models/{quote(key, safe='/')}/infer"
            headers = {"Content-Type": "application/json"}
            body = payload.v2_body or b""
        started = time.perf_counter()
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
                elapsed = (time.perf_counter() - started) * 1000.0
                code, detail = _error_fields(resp.status, data)
                return Outcome(route, resp.status, code, classify(resp.status, code), elapsed, detail)
        except asyncio.TimeoutError:
            elapsed = (time.perf_counter() - started) * 1000.0
            return Outcome(route, None, None, "timeout", elapsed, "client timeout")
        except aiohttp.ClientError as exc:
            elapsed = (time.perf_counter() - started) * 1000.0
            return Outcome(route, None, None, "connection", elapsed, f"{type(exc).__name__}: {exc}")


def _error_fields(status: int, data: bytes) -> tuple[str | None, str]:
    """The gateway's error `code` and message, from its `{"error", "code"}` body (if it is one)."""
    if status < 400:
        return None, ""
    try:
        obj = json.loads(data[:65536])
    except ValueError:
        return None, data[:200].decode(errors="replace")
    if not isinstance(obj, dict):
        return None, str(obj)[:200]
    return obj.get("code"), str(obj.get("error", ""))[:500]
