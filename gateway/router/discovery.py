"""Where the instances are: a static list, or a DNS name resolved again every few seconds.

A Kubernetes headless Service answers one A record per ready pod, so re-resolving it is discovery with no
registry to run. A failed resolution keeps the last answer: a DNS hiccup must not empty the fleet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Endpoint:
    """One gateway instance's addresses; `name` (host:http_port) identifies it in metrics and logs."""

    host: str
    http_port: int
    grpc_port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.http_port}"


def parse_static(text: str, default_grpc_port: int) -> list[Endpoint]:
    """`a:8080,b:8080:9081` -> endpoints; a missing gRPC port is `default_grpc_port` (IPv4 and names only)."""
    endpoints = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"instance {entry!r} is not host:http_port[:grpc_port]")
        grpc_port = int(parts[2]) if len(parts) == 3 else default_grpc_port
        endpoints.append(Endpoint(parts[0], int(parts[1]), grpc_port))
    if not endpoints:
        raise ValueError("no instances given")
    return sorted(set(endpoints))


async def resolve(name: str, http_port: int, grpc_port: int) -> list[Endpoint]:
    """Every address `name` resolves to, one endpoint each."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, http_port, type=socket.SOCK_STREAM)
    hosts = {str(info[4][0]) for info in infos}
    return sorted(Endpoint(host, http_port, grpc_port) for host in hosts)


class DnsDiscovery:
    """Resolves `name` every `interval_s` and hands each answer to `apply` (the fleet's update)."""

    def __init__(self, name: str, http_port: int, grpc_port: int, interval_s: float,
                 apply: Callable[[list[Endpoint]], None]) -> None:
        self.name, self.http_port, self.grpc_port = name, http_port, grpc_port
        self.interval_s = interval_s
        self._apply = apply
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        try:
            found = await asyncio.wait_for(resolve(self.name, self.http_port, self.grpc_port), self.interval_s)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("router.dns_failed", extra={"dns_name": self.name, "error": repr(exc)})
            return
        self._apply(found)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
