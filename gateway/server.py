"""Serving: the gateway's services, and its HTTP and gRPC edges started side by side and stopped in order.

uvicorn runs the HTTP app; its lifespan (defined here, not in the HTTP module) starts the services first,
then the gRPC edge, so both edges open only once Triton is up and the data plane can forward, and on
SIGTERM uvicorn drains HTTP requests before the gRPC edge gets its grace and the services stop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette

from gateway.api.guard import Guard, SigV4Credentials
from gateway.api.http import build_app
from gateway.api.sagemaker_container import ContainerApi
from gateway.api.kserve_grpc import GrpcEdge
from gateway.api.http_protocol import http_protocol
from gateway.app import Gateway
from gateway.config import Settings, flag
from gateway.keys import KeyRing

log = logging.getLogger(__name__)

_DRAIN_S = 30.0  # on SIGTERM, in-flight HTTP requests and gRPC calls get this long, side by side


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose shutdown also drains the gRPC edge, at the same time and with the same bound
    as HTTP (uvicorn alone would reach the gRPC edge only after HTTP had drained, through the lifespan)."""

    def __init__(self, config: uvicorn.Config, edges: list[GrpcEdge]) -> None:
        super().__init__(config)
        self.edges = edges

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = [asyncio.ensure_future(edge.stop(_DRAIN_S)) for edge in self.edges]
        try:
            await super().shutdown(sockets)
        finally:
            await asyncio.gather(*draining, return_exceptions=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def credentials(settings: Settings) -> tuple[KeyRing, SigV4Credentials | None]:
    """The API keys and SigV4 credentials in force; SystemExit naming the setting when they are unusable or
    when the gateway would listen beyond loopback with nobody checked (unless --insecure)."""
    try:
        keys = KeyRing(settings.api_keys_file, settings.api_keys)
    except ValueError as exc:
        raise SystemExit(f"API keys: {exc}") from None
    if bool(settings.sigv4_access_key_id) != bool(settings.sigv4_secret_access_key):
        raise SystemExit(f"{flag('sigv4_access_key_id')} and {flag('sigv4_secret_access_key')} go together")
    sigv4 = (SigV4Credentials(settings.sigv4_access_key_id, settings.sigv4_secret_access_key)
             if settings.sigv4_access_key_id and settings.sigv4_secret_access_key else None)
    if keys.enabled or sigv4 is not None:
        return keys, sigv4
    if not is_loopback(settings.host) and not settings.insecure:
        raise SystemExit(
            f"refusing to listen on {settings.host} without authentication: anyone reaching the port could load, "
            f"unload and call every model. Configure {flag('api_keys_file')} or {flag('api_keys')} (mme-gateway "
            f"keys create), or pass {flag('insecure')} to accept that.")
    log.warning("auth.disabled", extra={"host": settings.host, "insecure": settings.insecure,
                                        "hint": f"no API keys: every caller that reaches {settings.host} is trusted"})
    return keys, None


def application(settings: Settings) -> tuple[Gateway, Guard, list[GrpcEdge]]:
    """The services, the HTTP app whose lifespan starts and stops them with the gRPC edge, and that edge
    (once started) for the server to drain."""
    keys, sigv4 = credentials(settings)
    gw = Gateway(settings)
    edges: list[GrpcEdge] = []

    def ready() -> bool:
        return gw.ready

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gw.start()
        edge: GrpcEdge | None = None
        try:
            if settings.grpc_port:
                edge = GrpcEdge(gw.dataplane, ready, keys)
                await edge.start(settings.host, settings.grpc_port)
                edges.append(edge)
            yield
        finally:
            if edge is not None:
                await edge.stop(_DRAIN_S)  # drained already by DrainingServer on SIGTERM; waits for that
            await gw.stop()

    container = (ContainerApi(settings.container_api_root, gw.staging.limits) if settings.container_api else None)
    app = build_app(gw.dataplane, gw.manager, gw.metrics, gw.store.url, ready, lifespan, container)
    return gw, Guard(app, keys, sigv4, settings.max_request_bytes, settings.metrics_auth), edges


def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 1 when the gateway could not start."""
    _, app, edges = application(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, loop="uvloop",
        http=http_protocol(settings.header_timeout_s, settings.body_timeout_s),
        log_config=None, lifespan="on", access_log=False, timeout_graceful_shutdown=int(_DRAIN_S),
    )
    server = DrainingServer(config, edges)
    log.info("gateway.listening", extra={"host": settings.host, "port": settings.port})
    server.run()
    return 0 if server.started else 1
