"""Triton's explicit model-control API over gRPC.

Loads go over gRPC, not HTTP: an HTTP load request holds one of Triton's HTTP worker threads for the whole
load (triton-inference-server/server #8958), which would starve inference traffic while models load.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.errors import LoadTimedOut, ModelLoadFailed, TritonUnavailable
from gateway.triton import auth


@dataclass(frozen=True)
class IndexEntry:
    """One row of Triton's repository index."""

    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING, "" (never loaded)
    reason: str


class ModelControl(Protocol):
    """What the manager needs of Triton's model control (the cache benchmark stands in a timing model)."""

    async def load(self, name: str) -> None: ...
    async def unload(self, name: str) -> None: ...
    async def wait_unloaded(self, name: str, timeout_s: float = 30.0, poll_s: float = 0.05) -> bool: ...
    async def index(self) -> list[IndexEntry]: ...


def _unreachable(exc: InferenceServerException) -> bool:
    status = (exc.status() or "").upper()
    return "UNAVAILABLE" in status or "DEADLINE" in status or "failed to connect" in str(exc).lower()


class TritonControl:
    """Load, unload and index models; every call carries a timeout and the restricted APIs' secret."""

    def __init__(self, grpc_url: str, load_timeout_s: float, call_timeout_s: float = 10.0,
                 api_key: str | None = None) -> None:
        self.grpc_url = grpc_url
        self._headers = dict(auth.metadata(api_key) or ()) or None
        self._client_instance: grpcclient.InferenceServerClient | None = None
        self._load_timeout_s = load_timeout_s
        self._call_timeout_s = call_timeout_s

    @property
    def _client(self) -> grpcclient.InferenceServerClient:
        # grpc.aio channels bind to the running event loop: create on first use, inside the loop.
        if self._client_instance is None:
            self._client_instance = grpcclient.InferenceServerClient(url=self.grpc_url)
        return self._client_instance

    async def close(self) -> None:
        if self._client_instance is not None:
            await self._client_instance.close()
            self._client_instance = None

    async def is_ready(self) -> bool:
        try:
            return bool(await self._client.is_server_ready(headers=self._headers, client_timeout=self._call_timeout_s))
        except InferenceServerException:
            return False

    async def load(self, name: str) -> None:
        """Ask Triton to load `name` from its repository; raises ModelLoadFailed with Triton's reason."""
        try:
            await self._client.load_model(name, headers=self._headers, client_timeout=self._load_timeout_s)
        except InferenceServerException as exc:
            if "DEADLINE" in (exc.status() or "").upper():
                raise LoadTimedOut(f"{name} did not finish loading within {self._load_timeout_s:.0f}s "
                                   "(--load-timeout)") from None
            if _unreachable(exc):
                raise TritonUnavailable(f"Triton at {self.grpc_url} did not answer the load of {name}: {exc}") from None
            raise ModelLoadFailed(_clean_reason(str(exc.message() or exc))) from None

    async def unload(self, name: str) -> None:
        """Request an unload; Triton finishes it in the background (watch the index for UNAVAILABLE)."""
        try:
            await self._client.unload_model(name, headers=self._headers, client_timeout=self._call_timeout_s)
        except InferenceServerException as exc:
            if _unreachable(exc):
                raise TritonUnavailable(f"Triton at {self.grpc_url} did not answer the unload of {name}") from None
            raise

    async def index(self) -> list[IndexEntry]:
        try:
            resp = await self._client.get_model_repository_index(headers=self._headers, client_timeout=self._call_timeout_s)
        except InferenceServerException as exc:
            raise TritonUnavailable(f"Triton at {self.grpc_url} did not answer the index request: {exc}") from None
        return [IndexEntry(m.name, m.version, m.state, m.reason) for m in resp.models]

    async def state_of(self, name: str) -> str:
        for entry in await self.index():
            if entry.name == name:
                return entry.state
        return ""

    async def wait_unloaded(self, name: str, timeout_s: float = 30.0, poll_s: float = 0.05) -> bool:
        """Wait until the index no longer reports `name` READY/UNLOADING; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if await self.state_of(name) not in ("READY", "UNLOADING", "LOADING"):
                return True
            await asyncio.sleep(poll_s)
        return False


def _clean_reason(message: str) -> str:
    """Triton's load errors embed Python tracebacks; keep the first meaningful line for clients."""
    text = message.strip()
    for marker in ("\n\nAt:", "\nAt:"):
        if marker in text:
            text = text.split(marker, 1)[0]
    return text.strip()
