"""Serving the router: discovery, health checks, HTTP (uvicorn) and gRPC side by side, stopped in order.

uvicorn's lifespan starts the fleet's discovery and probes and the gRPC side before the HTTP port takes
requests; on SIGTERM HTTP drains first, then gRPC gets its grace, then the probes and the pools close.
HTTP is served through the gateway's own protocol (`gateway.api.http_protocol`), so the router's edge has
the same read timeouts as a gateway's. Health checks and listings have a connection pool of their own:
forwarded requests (streamed uploads hold a connection until their body ends) never make a probe wait for
a connection, time out, and take a healthy instance out.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import uvicorn

from gateway.api.http_protocol import http_protocol
from gateway.router.discovery import DnsDiscovery, parse_static
from gateway.router.fleet import Fleet
from gateway.router.grpc import GrpcForwarder
from gateway.router.health import Prober
from gateway.router.http import HttpForwarder, Receive, Scope, Send
from gateway.router.metrics import RouterMetrics
from gateway.router.settings import RouterSettings
from gateway.router.table import RoutingTable

log = logging.getLogger(__name__)

_GRPC_GRACE_S = 10.0
# Body bytes read ahead of the instance on one connection before reading pauses. The gateway reads 4 MiB
# ahead (its app takes a body whole); the router only passes chunks on, so a little more than one socket
# read (256 KiB) keeps uploads moving while 8 stalled ones hold about 8 MiB, not 32.
_READ_AHEAD_BYTES = 1 << 19


class Router:
    """The ASGI app; its lifespan builds the parts that need the running loop."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.fleet = Fleet()
        self.metrics = RouterMetrics(settings.routing_strategy)
        self.table = RoutingTable(self.fleet, self.metrics, settings.routing_strategy, settings.spill_threshold,
                                  affinity=settings.affinity == "on", spill_rate=settings.spill_rate)
        self._http: HttpForwarder | None = None
        self._grpc: GrpcForwarder | None = None
        self._prober: Prober | None = None
        self._dns: DnsDiscovery | None = None
        self._session: aiohttp.ClientSession | None = None
        self._probe_session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        s = self.settings
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=s.max_connections, ttl_dns_cache=None,
                                         enable_cleanup_closed=True)
        # auto_decompress off: answers go back to the client byte for byte.
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        self._probe_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                                    cookie_jar=aiohttp.DummyCookieJar())
        self._prober = Prober(self.fleet, self.metrics, self._probe_session, health_interval_s=s.health_interval_s,
                              listing_interval_s=s.listing_interval_s, timeout_s=s.probe_timeout_s,
                              unhealthy_after=s.unhealthy_after, api_key=s.upstream_api_key)
        self._http = HttpForwarder(self.table, self.fleet, self.metrics, self._session, s.upstream_timeout_s,
                                   s.max_request_bytes)
        self.fleet.on_added.append(self._prober.watch)
        self.fleet.on_removed.append(self._prober.unwatch)
        self.fleet.on_up.append(self._prober.relist)
        if s.grpc_port:
            self._grpc = GrpcForwarder(self.table, self.fleet, self.metrics, s.upstream_timeout_s,
                                       s.max_request_bytes)
            self.fleet.on_up.append(self._grpc.drop_channel)
            self.fleet.on_removed.append(self._grpc.drop_channel)
            await self._grpc.start(s.host, s.grpc_port)
        if s.instances:
            self.fleet.update(parse_static(s.instances, s.instance_grpc_port))
        else:
            assert s.dns_name
            self._dns = DnsDiscovery(s.dns_name, s.instance_http_port, s.instance_grpc_port, s.dns_interval_s,
                                     self.fleet.update)
            await self._dns.refresh()
            self._dns.start()
        log.info("router.started", extra={"strategy": s.routing_strategy, "affinity": s.affinity,
                                          "instances": sorted(self.fleet.instances)})

    async def stop(self) -> None:
        if self._dns is not None:
            await self._dns.stop()
        if self._grpc is not None:
            await self._grpc.stop(_GRPC_GRACE_S)
        if self._prober is not None:
            await self._prober.stop()
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()
        log.info("router.stopped")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        assert self._http is not None
        await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message: dict[str, Any] = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.exception("router.start_failed")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def run(settings: RouterSettings) -> int:
    """Serve until SIGTERM or SIGINT; 1 when the router could not start."""
    config = uvicorn.Config(Router(settings), host=settings.host, port=settings.port, loop="uvloop",
                            http=http_protocol(settings.header_timeout_s, settings.body_timeout_s, _READ_AHEAD_BYTES),
                            log_config=None, lifespan="on", access_log=False, timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    log.info("router.listening", extra={"host": settings.host, "port": settings.port})
    server.run()
    return 0 if server.started else 1
