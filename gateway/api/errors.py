"""Turning gateway errors into HTTP answers (KServe v2 shape: `{"error": "..."}`)."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.errors import GatewayError
from gateway.redact import public

log = logging.getLogger(__name__)


def error_response(exc: GatewayError) -> JSONResponse:
    headers = {"Retry-After": "5"} if exc.status in (503,) else None
    return JSONResponse({"error": public(exc.message), "code": exc.code}, status_code=exc.status, headers=headers)


async def handle_gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


def unexpected_response(path: str, exc: Exception) -> JSONResponse:
    """Last line of defence: log with the stack, answer 500 saying only that it happened, keep serving."""
    log.error("http.unhandled", extra={"path": path}, exc_info=exc)
    return JSONResponse({"error": f"internal gateway error ({type(exc).__name__}); the gateway's log has the details",
                         "code": "InternalError"}, status_code=500)


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_response(request.url.path, exc)
