"""The HTTP application: every adapter's routes on one Starlette app, and the gateway's lifespan."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from starlette.applications import Starlette

from gateway.api import kserve_http, ops, sagemaker
from gateway.api.errors import handle_gateway_error, handle_unexpected
from gateway.api.fastpath import InferFastPath
from gateway.api.grpc_server import GrpcEdge
from gateway.app import Gateway
from gateway.errors import GatewayError


def build_app(gw: Gateway) -> InferFastPath:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        """Start the gateway, then its gRPC edge (it forwards to Triton, so Triton must be up first); stop the
        edge first, with a short grace, so no gRPC call is still running when Triton goes away."""
        await gw.start()
        edge: GrpcEdge | None = None
        try:
            if gw.settings.grpc_port:
                edge = GrpcEdge(gw)
                await edge.start(gw.settings.host, gw.settings.grpc_port)
            yield
        finally:
            if edge is not None:
                await edge.stop()  # in-flight calls get a short grace, then are cancelled
            await gw.stop()

    app = Starlette(
        routes=[*ops.routes(gw), *sagemaker.routes(gw), *kserve_http.routes(gw)],
        lifespan=lifespan,
        exception_handlers={GatewayError: handle_gateway_error, Exception: handle_unexpected},
    )
    return InferFastPath(app, gw)
