"""The router's settings, declared once as `RouterSettings` fields with the gateway's flag and variable names.

The naming is `gateway.config`'s: `health_interval_s` is `--health-interval` and `MME_HEALTH_INTERVAL`.
The router runs in its own process (its own container in compose and Kubernetes), so the names it shares
with `mme-gateway serve` (`--port`, `MME_PORT`, ...) mean the same thing for the process they configure.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from gateway.config import add_arguments, flag, setting, values_from_args

STRATEGIES = ("least-outstanding-requests", "random")  # SageMaker's LEAST_OUTSTANDING_REQUESTS and RANDOM
SWITCH = ("on", "off")


@dataclass(frozen=True)
class RouterSettings:
    instances: str | None = setting(
        None, "gateway instances: comma-separated host:http_port[:grpc_port] (grpc_port defaults to "
        "--instance-grpc-port); or use --dns-name")
    dns_name: str | None = setting(
        None, "a DNS name with one address per instance (a Kubernetes headless Service), resolved again every "
        "--dns-interval seconds")
    instance_http_port: int = setting(8080, "instances' HTTP port, for --dns-name")
    instance_grpc_port: int = setting(8081, "instances' gRPC port, for --dns-name and entries without one")
    dns_interval_s: float = setting(5.0, "seconds between DNS resolutions of --dns-name")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8080, "HTTP port")
    grpc_port: int = setting(8081, "KServe v2 gRPC port (0: no gRPC)")
    routing_strategy: str = setting(
        "least-outstanding-requests", "how to choose among the instances holding a model", STRATEGIES)
    affinity: str = setting(
        "on", "off: ignore which instances hold a model and choose among all healthy ones by --routing-strategy, "
        "as a load balancer without model awareness does (for comparison)", SWITCH)
    spill_threshold: int = setting(
        8, "outstanding requests on every holder of a model beyond which its next request loads one more "
        "copy on the next instance in its hash order (0: never)")
    spill_rate: float = setting(
        0.0, "requests per second per copy of a model (this router's, over about 10 s) beyond which its next "
        "request loads one more copy (0: never)")
    health_interval_s: float = setting(1.0, "seconds between health checks of each instance")
    unhealthy_after: int = setting(2, "consecutive failed health checks that take an instance out")
    listing_interval_s: float = setting(
        2.0, "seconds between listings of each instance's loaded models and free model memory")
    probe_timeout_s: float = setting(2.0, "seconds a health check or listing may take")
    upstream_timeout_s: float = setting(
        600.0, "seconds one forwarded request may take (a cold load waits up to the gateway's --wait-timeout)")
    upstream_api_key: str | None = setting(
        None, "API key (manage scope) the router sends as a Bearer token for its own listings and /metrics "
        "reads; clients' own credentials are forwarded untouched")
    upstream_api_key_file: Path | None = setting(
        None, "a file holding --upstream-api-key (a mounted secret); read at start")
    max_request_bytes: int = setting(
        64 << 20, "cap on one request's body (HTTP: 413 beyond; gRPC: RESOURCE_EXHAUSTED), as the gateways' default")
    max_connections: int = setting(256, "HTTP connections kept to each instance")
    header_timeout_s: float = setting(10.0, "seconds a client may take to send a request's headers (408 after)")
    body_timeout_s: float = setting(30.0, "seconds a request body may stall between two chunks (408 after)")
    log_level: str = setting("info", "debug, info, warning or error")


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser, RouterSettings)


def router_settings_from_args(args: argparse.Namespace) -> RouterSettings:
    values = values_from_args(args, RouterSettings)
    if bool(values["instances"]) == bool(values["dns_name"]):
        raise SystemExit(f"give exactly one of {flag('instances')} and {flag('dns_name')}")
    if values["upstream_api_key_file"] is not None:
        if values["upstream_api_key"]:
            raise SystemExit(f"give {flag('upstream_api_key')} or {flag('upstream_api_key_file')}, not both")
        try:
            values["upstream_api_key"] = values["upstream_api_key_file"].read_text().strip() or None
        except OSError as exc:
            raise SystemExit(f"{flag('upstream_api_key_file')}: {exc}") from None
    if values["unhealthy_after"] < 1:
        raise SystemExit(f"{flag('unhealthy_after')} must be at least 1")
    return RouterSettings(**values)
