"""API keys on the gRPC edge: the `authorization: Bearer <key>` metadata checked before any handler runs.

The scopes match the HTTP edge's: ServerLive and ServerReady are health and stay open; the repository
calls (index, load, unload) need `manage`; everything else needs `invoke`, except that ModelStatistics for
every model at once (an empty name) is a listing like the repository index and needs `manage` (checked in
the handler, which sees the request). A refusal is UNAUTHENTICATED
(no key, or an unknown one) or PERMISSION_DENIED (a key without the scope), raised in a handler of the
call's own kind so streaming clients get a proper status too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from gateway.keys import INVOKE, MANAGE, ApiKey, KeyRing

log = logging.getLogger(__name__)

OPEN = "open"
_OPEN_METHODS = {"ServerLive", "ServerReady"}
_MANAGE_METHODS = {"RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}
_STREAMING_METHODS = {"ModelStreamInfer"}


def method_scope(method: str) -> str:
    """The scope a full gRPC method name (`/inference.GRPCInferenceService/ModelInfer`) needs."""
    name = method.rsplit("/", 1)[-1]
    if name in _OPEN_METHODS:
        return OPEN
    return MANAGE if name in _MANAGE_METHODS else INVOKE


def _refusal(method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def refuse_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield b""  # unreachable: makes this an async generator, as stream handlers are

    if method.rsplit("/", 1)[-1] in _STREAMING_METHODS:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


def bearer_key(keys: KeyRing, metadata: Any) -> tuple[ApiKey | None, str]:
    """The valid key a call's `authorization: Bearer <key>` metadata names (None if none), and the header as
    sent ("" when absent). The first `authorization` entry is the one read, here and nowhere else."""
    authorization = next((value for name, value in metadata or () if name == "authorization"), "")
    if isinstance(authorization, bytes):
        authorization = authorization.decode("latin-1")
    scheme, _, token = authorization.partition(" ")
    key = keys.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    return key, authorization


class KeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        need = method_scope(details.method)
        if need == OPEN:
            return await continuation(details)
        key, authorization = bearer_key(self.keys, details.invocation_metadata)
        if key is None:
            log.info("auth.refused", extra={"method": details.method, "reason": "Unauthenticated"})
            message = ("the API key is not valid" if authorization else
                       "an API key is required: send the metadata authorization: Bearer <key>")
            return _refusal(details.method, grpc.StatusCode.UNAUTHENTICATED, message)
        if need not in key.scopes:
            log.info("auth.forbidden", extra={"method": details.method, "key": key.name, "needs": need})
            return _refusal(details.method, grpc.StatusCode.PERMISSION_DENIED,
                            f"the API key {key.name!r} lacks the {need!r} scope this call needs")
        return await continuation(details)
