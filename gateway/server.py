"""Serving: the gateway's services, and its HTTP and gRPC edges started side by side and stopped in order.

uvicorn runs the HTTP app; its lifespan (defined here, not in the HTTP module) starts the services first,
then the gRPC edge, so both edges open only once Triton is up and the data plane can forward, and on
SIGTERM uvicorn drains HTTP requests before the gRPC edge gets its grace and the services stop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette

from gateway.api.fastpath import InferFastPath
from gateway.api.http import build_app
from gateway.api.kserve_grpc import GrpcEdge
from gateway.app import Gateway
from gateway.config import Settings

log = logging.getLogger(__name__)

_GRPC_GRACE_S = 10.0  # in-flight gRPC calls get this long after HTTP has drained


def application(settings: Settings) -> tuple[Gateway, InferFastPath]:
    """The services and the HTTP app whose lifespan starts and stops them with the gRPC edge."""
    gw = Gateway(settings)

    def ready() -> bool:
        return gw.ready

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        edge: GrpcEdge | None = None
        try:
            if settings.grpc_port:
                edge = GrpcEdge(gw.dataplane, ready)
                await edge.start(settings.host, settings.grpc_port)
            yield
        finally:
            if edge is not None:
                await edge.stop(_GRPC_GRACE_S)
            await gw.stop()

    return gw, build_app(gw.dataplane, gw.manager, gw.metrics, gw.store.url, ready, lifespan)


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 1 when the gateway could not start."""
    _, app = application(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        log_config=None, lifespan="on", access_log=False, timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    log.info("gateway.listening", extra={"host": settings.host, "port": settings.port})
    server.run()
    return 0 if server.started else 1
