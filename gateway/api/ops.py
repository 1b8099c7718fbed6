"""Operations: Prometheus metrics (health lives with the KServe routes, the SageMaker ping with its API)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.metrics import Metrics


def routes(metrics: Metrics) -> list[Route]:
    async def render(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return [Route("/metrics", render, methods=["GET"])]
