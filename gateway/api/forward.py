"""The one inference path every HTTP adapter shares: lease the model, forward the body, count the result."""

from __future__ import annotations

import json
from typing import Mapping

from gateway.app import Gateway
from gateway.errors import GatewayError
from gateway.proxy import Forwarded

_HEADER_LENGTH = "inference-header-content-length"


def restore_model_name(answer: Forwarded, triton_name: str, key: str) -> tuple[bytes, dict[str, str]]:
    """Put the client's TargetModel back where Triton wrote its internal name (`"model_name":"..."`).

    Only the JSON header is touched: the whole body for a JSON answer, the first
    Inference-Header-Content-Length bytes for a binary-tensor answer (whose length header is updated);
    tensor bytes are never looked at. Compressed answers pass through as they are.
    """
    if "content-encoding" in answer.headers:
        return answer.body, answer.headers
    needle = b'"model_name":"' + triton_name.encode() + b'"'
    replacement = b'"model_name":' + json.dumps(key).encode()
    header_length = answer.headers.get(_HEADER_LENGTH)
    if header_length is None:
        return answer.body.replace(needle, replacement, 1), answer.headers
    n = int(header_length)
    head = answer.body[:n].replace(needle, replacement, 1)
    if len(head) == n:
        return answer.body, answer.headers
    return head + answer.body[n:], {**answer.headers, _HEADER_LENGTH: str(len(head))}


async def infer(
    gw: Gateway, key: str, body: bytes, headers: Mapping[str, str], protocol: str, version: str | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """POST `body` to Triton's infer endpoint for `key` while holding a lease on it: (status, body, headers)."""
    status = 500
    try:
        async with gw.manager.lease(key) as rec:
            path = f"/v2/models/{rec.name}" + (f"/versions/{version}" if version else "") + "/infer"
            answer = await gw.proxy.request("POST", path, body, headers)
            status = answer.status
            payload, out_headers = restore_model_name(answer, rec.name, key)
            return answer.status, payload, out_headers
    except GatewayError as exc:
        status = exc.status
        raise
    finally:
        gw.metrics.count_request(protocol, status)

