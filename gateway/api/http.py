"""The HTTP application: every adapter's routes on one Starlette app, and the gateway's lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.applications import Starlette

from gateway.api import kserve_http, ops, sagemaker
from gateway.api.errors import handle_gateway_error, handle_unexpected
from gateway.app import Gateway
from gateway.errors import GatewayError


def build_app(gw: Gateway) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    return Starlette(
        routes=[*ops.routes(gw), *sagemaker.routes(gw), *kserve_http.routes(gw)],
        lifespan=lifespan,
        exception_handlers={GatewayError: handle_gateway_error, Exception: handle_unexpected},
    )
