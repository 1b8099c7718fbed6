"""The HTTP edge's door, in raw ASGI in front of every route: who may call what, and how big a body may be.

Each request is classed by its path before anything else happens:
- health (`/v2/health/*`, `/ping`) is open, so load balancers and orchestrators need no key;
- `/metrics` is open unless `--metrics-auth`, then any key;
- the repository (`/v2/repository/*`) and the SageMaker container API (`/models...`) need `manage`;
- everything else needs `invoke`; the SageMaker runtime routes also take AWS SigV4 (botocore's signing).

Keys arrive as `Authorization: Bearer <key>`. A body larger than `--max-request-bytes` is refused from its
Content-Length before a byte of it is read, and a chunked one as soon as it passes the cap, so an oversized
upload never sits in memory. With no key source and no SigV4 credentials configured, authentication is off
(the gateway then listens on loopback only; see `gateway.server`), but the size cap still holds.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from gateway.api.errors import error_response
from gateway.api.fastpath import ASGIApp, Receive, Scope, Send
from gateway.api.sagemaker_runtime import CUSTOM_ATTRIBUTES_HEADER, SageMakerError, runtime_error, runtime_response
from gateway.errors import Forbidden, GatewayError, RequestTooLarge, Unauthenticated
from gateway.keys import INVOKE, MANAGE, KeyRing
from gateway.sigv4 import SigV4Failure, is_sigv4, verify

log = logging.getLogger(__name__)

OPEN, ANY_KEY = "open", "any"
_HEALTH = ("/v2/health/live", "/v2/health/ready", "/ping")


def required_scope(method: str, path: str, metrics_auth: bool) -> str:
    """What a request to `path` needs: OPEN, ANY_KEY, INVOKE or MANAGE."""
    if path in _HEALTH:
        return OPEN
    if path == "/metrics":
        return ANY_KEY if metrics_auth else OPEN
    if path.startswith("/v2/repository/") or path == "/models" or path.startswith("/models/"):
        return MANAGE
    return INVOKE


def is_sagemaker_runtime(path: str) -> bool:
    """`/invocations` and `/endpoints/{EndpointName}/invocations`: answered in botocore's error shape."""
    return path == "/invocations" or (path.startswith("/endpoints/") and path.endswith("/invocations"))


class SigV4Credentials:
    def __init__(self, access_key_id: str, secret_access_key: str) -> None:
        self.access_key_id, self.secret_access_key = access_key_id, secret_access_key


class Guard:
    """Authentication, scopes and the body-size cap for the HTTP app behind it."""

    def __init__(self, app: ASGIApp, keys: KeyRing | None, sigv4: SigV4Credentials | None, max_request_bytes: int,
                 metrics_auth: bool = False) -> None:
        self.app = app
        self.keys = keys if keys is not None and keys.enabled else None
        self.sigv4 = sigv4
        self.max_request_bytes = max_request_bytes
        self.metrics_auth = metrics_auth
        self.enabled = self.keys is not None or sigv4 is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        sagemaker = is_sagemaker_runtime(path)
        try:
            length, authorization = self._headers(scope)
            if length is not None and length > self.max_request_bytes:
                raise RequestTooLarge(f"the request body ({length} bytes) is over the gateway's limit of "
                                      f"{self.max_request_bytes} bytes")
            if length is None and scope["method"] not in ("GET", "HEAD", "DELETE"):
                receive = self._capped(receive)
            if self.enabled:
                need = required_scope(scope["method"], path, self.metrics_auth)
                if need != OPEN:
                    if sagemaker and self.sigv4 is not None and is_sigv4(authorization):
                        receive = await self._check_sigv4(scope, receive)
                    else:
                        self._check_key(authorization, need, path)
        except GatewayError as exc:
            return await self._refuse(exc, sagemaker, scope, receive, send)
        except SigV4Failure as exc:
            log.info("auth.refused", extra={"path": path, "reason": exc.code, "client": _client(scope)})
            err = SageMakerError(exc.code, 403, exc.message, "Unauthenticated")
            return await runtime_response(err, str(uuid.uuid4()), None)(scope, receive, send)
        return await self.app(scope, receive, send)

    # -- the parts --------------------------------------------------------------------------------------------

    @staticmethod
    def _headers(scope: Scope) -> tuple[int | None, str | None]:
        length = authorization = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        return length, authorization

    def _capped(self, receive: Receive) -> Receive:
        """A chunked body (no Content-Length): counted as it arrives, refused once it passes the cap."""
        seen = 0
        cap = self.max_request_bytes

        async def counting() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > cap:
                raise RequestTooLarge(f"the request body passed the gateway's limit of {cap} bytes")
            return message
        return counting

    def _check_key(self, authorization: str | None, need: str, path: str) -> None:
        if self.keys is None:  # SigV4 alone is configured: only signed SageMaker calls get in
            raise Unauthenticated("this route needs an API key (Authorization: Bearer <key>); none are configured")
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key>")
        key = self.keys.check(token.strip())
        if key is None:
            raise Unauthenticated("the API key is not valid")
        if need not in (ANY_KEY, *key.scopes):
            log.info("auth.forbidden", extra={"path": path, "key": key.name, "needs": need})
            raise Forbidden(f"the API key {key.name!r} lacks the {need!r} scope this route needs")

    async def _check_sigv4(self, scope: Scope, receive: Receive) -> Receive:
        """Read the (capped) body, check the signature over it, and hand the app a receive that replays it."""
        assert self.sigv4 is not None
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        verify(scope["method"], raw_path, scope.get("query_string", b"").decode("latin-1"), headers, body,
               self.sigv4.access_key_id, self.sigv4.secret_access_key)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # the client's disconnect, if it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return replay

    async def _refuse(self, exc: GatewayError, sagemaker: bool, scope: Scope, receive: Receive, send: Send) -> None:
        if isinstance(exc, (Unauthenticated, Forbidden)):
            log.info("auth.refused", extra={"path": scope["path"], "reason": exc.code, "client": _client(scope)})
        if sagemaker:
            custom = dict(scope["headers"]).get(CUSTOM_ATTRIBUTES_HEADER.lower().encode())
            response = runtime_response(runtime_error(exc), str(uuid.uuid4()),
                                        None if custom is None else custom.decode("latin-1"))
        else:
            response = error_response(exc)
        if isinstance(exc, Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Bearer realm="mme-gateway"'
        await response(scope, receive, send)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"
