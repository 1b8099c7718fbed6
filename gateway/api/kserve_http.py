"""KServe v2 over HTTP: `/v2/models/{TargetModel}/...`, the TargetModel being a store key with slashes.

Inference (`POST .../infer`) is served by the raw-ASGI fast path in `fastpath.py`, in front of these routes.
Metadata, config and statistics come from Triton through the data plane, renamed to the TargetModel the
client used (perf_analyzer and tritonclient read these before inferring, so a metadata or config call on a
cold model loads it). The repository extension maps to the gateway's lifecycle.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import gateway
from gateway.dataplane import DataPlane
from gateway.errors import InvalidRequest

EXTENSIONS = ["classification", "model_repository", "schedule_policy", "model_configuration", "binary_tensor_data",
              "parameters", "statistics"]


def routes(dp: DataPlane) -> list[Route]:
    async def resource(request: Request, suffix: str) -> Response:
        answer = await dp.resource_json(request.path_params["model"], suffix, request.path_params.get("version"))
        return Response(answer.body, status_code=answer.status, headers=answer.headers)

    async def metadata(request: Request) -> Response:
        return await resource(request, "")

    async def config(request: Request) -> Response:
        return await resource(request, "/config")

    async def stats(request: Request) -> Response:
        return await resource(request, "/stats")

    async def ready(request: Request) -> Response:
        return Response(status_code=200 if dp.model_ready(request.path_params["model"]) else 400)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "mme-gateway", "version": gateway.__version__, "extensions": EXTENSIONS})

    async def repository_index(request: Request) -> Response:
        body = await request.body()
        try:
            spec = json.loads(body) if body else {}
        except ValueError as exc:
            raise InvalidRequest(f"the body is not JSON: {exc}") from None
        ready_only = isinstance(spec, dict) and bool(spec.get("ready"))
        rows = [{"name": row.key, "version": "1", "state": row.state, "reason": row.reason}
                for row in dp.index(ready_only)]
        return JSONResponse(rows)

    async def repository_load(request: Request) -> Response:
        await dp.load(request.path_params["model"])
        return Response(status_code=200)

    async def repository_unload(request: Request) -> Response:
        await dp.unload(request.path_params["model"])
        return Response(status_code=200)

    m, v = "/v2/models/{model:path}", "/v2/models/{model:path}/versions/{version}"
    return [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model:path}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{model:path}/unload", repository_unload, methods=["POST"]),
        # Versioned and suffixed routes first: `{model:path}` is greedy and would swallow them.
        Route(v + "/ready", ready, methods=["GET"]),
        Route(v + "/config", config, methods=["GET"]),
        Route(v + "/stats", stats, methods=["GET"]),
        Route(v, metadata, methods=["GET"]),
        Route(m + "/ready", ready, methods=["GET"]),
        Route(m + "/config", config, methods=["GET"]),
        Route(m + "/stats", stats, methods=["GET"]),
        Route(m, metadata, methods=["GET"]),
    ]


def health_routes(ready: Callable[[], bool]) -> list[Route]:
    """KServe's server health: live while the process runs, ready once the gateway can load models."""
    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def is_ready(request: Request) -> Response:
        return Response(status_code=200 if ready() else 503)

    return [Route("/v2/health/live", live, methods=["GET"]), Route("/v2/health/ready", is_ready, methods=["GET"])]
