"""Triton's HTTP data API over pooled keep-alive connections: inference and model resources.

Bodies pass through as bytes: JSON and binary-tensor requests reach Triton unchanged and tensors are never
decoded in the gateway. Callers name the model by its Triton name in the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import aiohttp

from gateway.errors import TritonUnavailable, UpstreamTimeout

# Request headers Triton's HTTP API acts on; the rest (cookies, auth for the gateway, ...) stay here.
_FORWARD_REQUEST = ("content-type", "inference-header-content-length", "content-encoding", "accept-encoding")
_FORWARD_RESPONSE = ("content-type", "inference-header-content-length", "content-encoding")


@dataclass(frozen=True)
class Forwarded:
    status: int
    headers: dict[str, str]
    body: bytes


class TritonHttp:
    """One aiohttp session (keep-alive pool) to Triton's HTTP endpoint."""

    def __init__(self, http_url: str, max_connections: int = 256, timeout_s: float = 300.0) -> None:
        self.base = http_url if http_url.startswith("http") else f"http://{http_url}"
        self._max_connections = max_connections
        self.timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=5.0)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
        # No default Accept-Encoding: Triton compresses only when the client asked for it.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )

    async def close(self) -> None:
        if self._session:
            await self._session.close()

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> Forwarded:
        """Send `method path` to Triton and return its answer whole."""
        assert self._session is not None, "TritonHttp.start() not called"
        fwd = {k: v for k, v in (headers or {}).items() if k.lower() in _FORWARD_REQUEST}
        try:
            async with self._session.request(method, self.base + path, data=body, headers=fwd) as resp:
                payload = await resp.read()
                out = {k.lower(): v for k, v in resp.headers.items() if k.lower() in _FORWARD_RESPONSE}
                return Forwarded(status=resp.status, headers=out, body=payload)
        except TimeoutError:  # aiohttp's ServerTimeoutError is one too: Triton is there but silent
            raise UpstreamTimeout(f"Triton did not answer {method} {path} within {self.timeout_s:.0f}s "
                                  "(--infer-timeout)") from None
        except aiohttp.ClientConnectionError as exc:
            raise TritonUnavailable(f"Triton at {self.base} did not answer {method} {path}: {exc}") from None
