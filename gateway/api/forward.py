"""The one inference path every HTTP adapter shares: lease the model, forward the body, count the result."""

from __future__ import annotations

from typing import Mapping

from starlette.responses import Response

from gateway.app import Gateway
from gateway.errors import GatewayError


async def forward_infer(
    gw: Gateway, key: str, body: bytes, headers: Mapping[str, str], protocol: str, version: str | None = None
) -> Response:
    """POST `body` to Triton's infer endpoint for `key` while holding a lease on it."""
    status = 500
    try:
        async with gw.manager.lease(key) as rec:
            path = f"/v2/models/{rec.name}" + (f"/versions/{version}" if version else "") + "/infer"
            answer = await gw.proxy.request("POST", path, body, headers)
            status = answer.status
            return Response(answer.body, status_code=answer.status, headers=answer.headers)
    except GatewayError as exc:
        status = exc.status
        raise
    finally:
        gw.metrics.requests.labels(protocol=protocol, status=str(status)).inc()
