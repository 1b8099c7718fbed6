"""The HTTP edge's door, in raw ASGI in front of every route: who may call what, and how big a body may be.

Each request is classed by its path before anything else happens:
- health (`/v2/health/*`, `/ping`) is open, so load balancers and orchestrators need no key;
- `/metrics` is open unless `--metrics-auth`, then any key;
- the repository (`/v2/repository/*`) and the SageMaker container API (`/models...`) need `manage`;
- everything else needs `invoke`; the SageMaker runtime routes also take AWS SigV4 (botocore's signing).

Keys arrive as `Authorization: Bearer <key>`. With no key source and no SigV4 credentials configured,
authentication is off (the gateway then listens on loopback only; see `gateway.server`), but every check on
the request's form below still holds.

Headers first, body last. Everything the headers decide is decided before a byte of the body is read, in
this order, whatever the method and authentication mode:
1. a header the gateway routes or authenticates by (Authorization, Host, Content-Type, X-Amz-Date,
   X-Amz-Content-Sha256, X-Amzn-SageMaker-Target-Model) sent more than once: 400 naming it. This guard is the
   one place that refuses repeats, so the route (which reads the first) and SigV4 read the same bytes;
2. a body on any method but POST (the only one whose routes take a body): 400, whether it is announced by
   Content-Length or sent chunked;
3. a Content-Length over `--max-request-bytes`: 413 (a chunked body is counted as it arrives instead, and
   refused once it passes the cap);
4. the credentials: a missing or unknown key, a scope the key lacks, or a SigV4 request whose headers
   already fail (`gateway.sigv4.check_head`: form, access key id, scope, date, which headers are signed, and
   the whole signature when X-Amz-Content-SHA256 is signed): 401 or 403.
A refusal of a request whose body is still to come says `Connection: close`, and the connection is closed
after it, so the rest of that body is never read; the most a refused request makes the gateway read is what
arrived with its headers in the same socket read. So a request with no valid key, or with SigV4 headers that
fail, costs no body at all.

What is read. Only a request past all four checks has its body read, and never more than
`--max-request-bytes` of it. For SigV4 that includes one case decided by the body: a request naming the
configured access key id, dated within 15 minutes, whose signature covers the body's hash without the
client sending that hash (boto3's usual form). Its body is read (capped, under `--body-timeout`, hashed as
it arrives) and only then is the signature decided. An access key id is not a secret, so this is the most a
client without the secret can make the gateway read: one capped body per request, as for any keyed
request. A client that signs X-Amz-Content-SHA256 is decided from its headers, and its body must then match
that hash.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import uuid
from typing import Any, NamedTuple

from starlette.responses import Response

from gateway.api.errors import error_response
from gateway.api.fastpath import ASGIApp, Receive, Scope, Send
from gateway.api.sagemaker_runtime import (
    CUSTOM_ATTRIBUTES_HEADER,
    TARGET_MODEL_HEADER,
    SageMakerError,
    runtime_error,
    runtime_response,
)
from gateway.errors import Forbidden, GatewayError, InvalidRequest, RequestTooLarge, Unauthenticated
from gateway.keys import INVOKE, MANAGE, KeyRing
from gateway.sigv4 import CONTENT_SHA256, HeadChecked, SigV4Failure, check_head, is_sigv4

log = logging.getLogger(__name__)

OPEN, ANY_KEY = "open", "any"
_HEALTH = ("/v2/health/live", "/v2/health/ready", "/ping")
# Headers that decide where a request goes or who sent it: each must come once (see the module's doc).
ONCE_ONLY = frozenset({b"authorization", b"host", b"content-type", b"x-amz-date", CONTENT_SHA256.encode(),
                       TARGET_MODEL_HEADER.encode()})
BODY_METHODS = frozenset({"POST"})  # the only method any route reads a body for


class Head(NamedTuple):
    """What the guard needs from a request's headers, read in one pass."""

    length: int | None  # Content-Length, if sent
    chunked: bool  # a Transfer-Encoding was sent: the body's length is known only at its end
    authorization: str | None
    repeated: str | None  # the first once-only header that came twice

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)


def read_head(headers: list[tuple[bytes, bytes]]) -> Head:
    """One pass over the ASGI headers (names lower-cased); on every request, so it looks at little."""
    length: int | None = None
    authorization: str | None = None
    repeated: str | None = None
    chunked = False
    seen: set[bytes] = set()
    for name, value in headers:
        if name in ONCE_ONLY:
            if name in seen:
                repeated = repeated or name.decode("latin-1")
                continue
            seen.add(name)
            if name == b"authorization":
                authorization = value.decode("latin-1")
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"transfer-encoding":
            chunked = True
    return Head(length, chunked, authorization, repeated)


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
    """The request's form, authentication, scopes and the body-size cap for the HTTP app behind it."""

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
        method: str = scope["method"]
        sagemaker = is_sagemaker_runtime(path)
        head = read_head(scope["headers"])
        unread = head.has_body  # a refusal while the body is still to come closes the connection after it
        try:
            if head.repeated is not None:
                raise InvalidRequest(f"the {head.repeated} header was sent more than once: send it once")
            if head.has_body and method not in BODY_METHODS:
                raise InvalidRequest(f"a {method} request takes no body here (only POST requests carry one)")
            if head.length is not None and head.length > self.max_request_bytes:
                raise RequestTooLarge(f"the request body ({head.length} bytes) is over the gateway's limit of "
                                      f"{self.max_request_bytes} bytes")
            if head.chunked:
                receive = self._capped(receive)
            if self.enabled:
                need = required_scope(method, path, self.metrics_auth)
                if need != OPEN:
                    if sagemaker and self.sigv4 is not None and is_sigv4(head.authorization):
                        checked = self._check_sigv4_head(scope)
                        read = await _read_body(receive)
                        if read is None:
                            return  # the client left before its body ended: nobody to answer
                        messages, body_sha256 = read
                        unread = False
                        checked.check_body(body_sha256)
                        receive = _replay(messages, receive)
                    else:
                        self._check_key(head.authorization, need, path)
        except GatewayError as exc:
            return await self._refuse(exc, sagemaker, unread, scope, receive, send)
        except SigV4Failure as exc:
            log.info("auth.refused", extra={"path": path, "reason": exc.code, "client": _client(scope)})
            err = SageMakerError(exc.code, 403, exc.message, "Unauthenticated")
            return await _answer(runtime_response(err, str(uuid.uuid4()), None), unread, scope, receive, send)
        return await self.app(scope, receive, send)

    # -- the parts --------------------------------------------------------------------------------------------

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

    def _check_sigv4_head(self, scope: Scope) -> HeadChecked:
        """SigV4's checks that need no body (`gateway.sigv4.check_head`), over the headers as the route reads
        them (the first of each); a repeated signed header is refused, since signers join repeats."""
        assert self.sigv4 is not None
        headers: dict[str, str] = {}
        repeated: set[str] = set()
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1")
            if name in headers:
                repeated.add(name)
            else:
                headers[name] = raw_value.decode("latin-1")
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        checked = check_head(scope["method"], raw_path, scope.get("query_string", b"").decode("latin-1"), headers,
                             self.sigv4.access_key_id, self.sigv4.secret_access_key)
        twice = sorted(repeated.intersection(checked.signed_headers))
        if twice:
            raise InvalidRequest(f"the {twice[0]} header was sent more than once: send it once")
        return checked

    async def _refuse(self, exc: GatewayError, sagemaker: bool, unread: bool, scope: Scope, receive: Receive,
                      send: Send) -> None:
        if isinstance(exc, (Unauthenticated, Forbidden)):
            log.info("auth.refused", extra={"path": scope["path"], "reason": exc.code, "client": _client(scope)})
        response: Response
        if sagemaker:
            custom = dict(scope["headers"]).get(CUSTOM_ATTRIBUTES_HEADER.lower().encode())
            response = runtime_response(runtime_error(exc), str(uuid.uuid4()),
                                        None if custom is None else custom.decode("latin-1"))
        else:
            response = error_response(exc)
        if isinstance(exc, Unauthenticated):
            response.headers["WWW-Authenticate"] = 'Bearer realm="mme-gateway"'
        await _answer(response, unread, scope, receive, send)


async def _answer(response: Response, unread: bool, scope: Scope, receive: Receive, send: Send) -> None:
    """Send a refusal; with the body still unread, close the connection after it rather than read the body
    through (uvicorn closes a connection whose response says `Connection: close`)."""
    if unread:
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


async def _read_body(receive: Receive) -> tuple[list[dict[str, Any]], str] | None:
    """The whole body as the messages that carried it, and its SHA-256 taken as they came; None if the client
    went away first."""
    messages = []
    hasher = hashlib.sha256()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        hasher.update(message.get("body", b""))
        messages.append(message)
        if not message.get("more_body"):
            return messages, hasher.hexdigest()


def _replay(messages: list[dict[str, Any]], receive: Receive) -> Receive:
    """A receive() that hands the app the body's messages again, then passes on what comes after (the
    client's disconnect, if it comes)."""
    queue = collections.deque(messages)

    async def replay() -> dict[str, Any]:
        return queue.popleft() if queue else await receive()
    return replay


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"
