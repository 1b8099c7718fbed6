"""The SageMaker edges: the runtime API (`/invocations` with the TargetModel header) and the multi-model
container API (`/ping`, `/models`)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.forward import forward_infer
from gateway.api.views import describe
from gateway.app import Gateway
from gateway.errors import InvalidModelKey

TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"


def routes(gw: Gateway) -> list[Route]:
    async def invocations(request: Request) -> Response:
        key = request.headers.get(TARGET_MODEL_HEADER)
        if not key:
            raise InvalidModelKey(f"missing the {TARGET_MODEL_HEADER} header naming the TargetModel")
        return await forward_infer(gw, key, await request.body(), request.headers, "sagemaker")

    async def ping(request: Request) -> Response:
        return JSONResponse({"status": "Healthy" if gw.ready else "Unhealthy"}, status_code=200 if gw.ready else 503)

    async def list_models(request: Request) -> Response:
        now = time.monotonic()
        return JSONResponse({"models": [describe(rec, now) for rec in gw.manager.records()]})

    return [
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        Route("/models", list_models, methods=["GET"]),
    ]
