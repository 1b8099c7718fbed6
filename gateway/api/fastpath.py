"""The hot path in raw ASGI: `POST /v2/models/{TargetModel}[/versions/{v}]/infer` skips Starlette.

Inference is nearly every request a gateway sees, and Starlette's routing (a regex per route), middleware
stack and Request/Response objects cost more CPU per call than the lease and the forwarding themselves.
This shim answers exactly what the KServe infer routes answer, errors included, and hands every other
request to the Starlette app unchanged.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from gateway.api.errors import error_response, unexpected_response
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError
from gateway.naming import validate_key
from gateway.triton.http import FORWARD_REQUEST

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_PREFIX, _SUFFIX, _VERSIONS = "/v2/models/", "/infer", "/versions/"
# The request headers Triton acts on, as ASGI gives them (all others are the gateway's, or nobody's, business).
_WANTED = frozenset(name.encode() for name in FORWARD_REQUEST)


def parse_infer_path(path: str) -> tuple[str, str | None] | None:
    """(TargetModel, version or None) for an infer path, None for anything else."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    model = path[len(_PREFIX) : -len(_SUFFIX)]
    head, sep, version = model.rpartition(_VERSIONS)
    if sep and head and version and "/" not in version:
        return head, version
    return (model, None) if model else None


class InferFastPath:
    def __init__(self, app: ASGIApp, dp: DataPlane) -> None:
        self.app = app
        self.dp = dp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        target = parse_infer_path(scope["path"])
        if target is None:
            return await self.app(scope, receive, send)
        key, version = target
        try:
            validate_key(key)  # before a byte of the body is read: a bad key costs nothing
        except GatewayError as exc:
            self.dp.metrics.count_request("kserve_http", exc.status)
            return await error_response(exc)(scope, receive, send)
        try:
            parts = []  # forwarded as they arrived: a large tensor is never joined into one more copy
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body = message.get("body", b"")
                if body:
                    parts.append(body)
                if not message.get("more_body"):
                    break
            headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}
            answer = await self.dp.infer(key, parts[0] if len(parts) == 1 else parts, headers, "kserve_http",
                                         version)
        except GatewayError as exc:  # errors are rare: the Starlette app's own answers, as ASGI apps
            return await error_response(exc)(scope, receive, send)
        except Exception as exc:
            return await unexpected_response(scope["path"], exc)(scope, receive, send)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
        raw.append((b"content-length", str(len(answer.body)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        await send({"type": "http.response.body", "body": answer.body})
