"""HTTP edge: KServe v2 inference, SageMaker-style `/invocations`, health, metrics and model listing.

The TargetModel travels in the URL path (`/v2/models/cities/Houston_TX.tar.gz/infer`) or in the
`X-Amzn-SageMaker-Target-Model` header (`/invocations`). Request bodies go to Triton untouched.
"""

from __future__ import annotations

import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.errors import handle_gateway_error, handle_unexpected
from gateway.app import Gateway
from gateway.errors import GatewayError, InvalidModelKey

TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"


def build_routes(gw: Gateway) -> list[Route]:
    manager, proxy, metrics = gw.manager, gw.proxy, gw.metrics

    async def forward_infer(request: Request, key: str, protocol: str, version: str | None = None) -> Response:
        body = await request.body()
        status = 500
        try:
            async with manager.lease(key) as rec:
                path = f"/v2/models/{rec.name}" + (f"/versions/{version}" if version else "") + "/infer"
                answer = await proxy.request("POST", path, body, request.headers)
                status = answer.status
                return Response(answer.body, status_code=answer.status, headers=answer.headers)
        except GatewayError as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels(protocol=protocol, status=str(status)).inc()

    async def v2_infer(request: Request) -> Response:
        return await forward_infer(request, request.path_params["model"], "kserve_http")

    async def v2_infer_version(request: Request) -> Response:
        p = request.path_params
        return await forward_infer(request, p["model"], "kserve_http", version=p["version"])

    async def invocations(request: Request) -> Response:
        key = request.headers.get(TARGET_MODEL_HEADER)
        if not key:
            raise InvalidModelKey(f"missing the {TARGET_MODEL_HEADER} header naming the TargetModel")
        return await forward_infer(request, key, "sagemaker")

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if gw.ready else 503)

    async def ping(request: Request) -> Response:
        return JSONResponse({"status": "Healthy" if gw.ready else "Unhealthy"}, status_code=200 if gw.ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def list_models(request: Request) -> Response:
        now = time.monotonic()
        models = [
            {
                "modelName": rec.model.key,
                "tritonName": rec.name,
                "state": rec.state.value,
                "etag": rec.etag,
                "artifactBytes": rec.artifact_bytes,
                "leases": rec.leases,
                "hits": rec.hits,
                "misses": rec.misses,
                "idleSeconds": round(now - rec.last_used, 3) if rec.last_used else None,
                "downloadSeconds": rec.download_s,
                "loadSeconds": rec.load_s,
                "error": rec.error.message if rec.error else None,
            }
            for rec in manager.records()
        ]
        return JSONResponse({"models": models})

    return [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
        # The versioned route first: `{model:path}` is greedy and would swallow `/versions/N`.
        Route("/v2/models/{model:path}/versions/{version}/infer", v2_infer_version, methods=["POST"]),
        Route("/v2/models/{model:path}/infer", v2_infer, methods=["POST"]),
    ]


def build_app(gw: Gateway) -> Starlette:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    return Starlette(
        routes=build_routes(gw),
        lifespan=lifespan,
        exception_handlers={GatewayError: handle_gateway_error, Exception: handle_unexpected},
    )
