"""KServe v2 over HTTP: `/v2/models/{TargetModel}/...`, the TargetModel being a store key with slashes."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.api.forward import forward_infer
from gateway.app import Gateway


def routes(gw: Gateway) -> list[Route]:
    async def infer(request: Request) -> Response:
        p = request.path_params
        return await forward_infer(gw, p["model"], await request.body(), request.headers, "kserve_http",
                                   version=p.get("version"))

    return [
        # Versioned routes first: `{model:path}` is greedy and would swallow `/versions/N`.
        Route("/v2/models/{model:path}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{model:path}/infer", infer, methods=["POST"]),
    ]
