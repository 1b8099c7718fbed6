"""KServe v2 over HTTP: `/v2/models/{TargetModel}/...`, the TargetModel being a store key with slashes.

Inference (`POST .../infer`) is served by the raw-ASGI fast path in `fastpath.py`, in front of these routes;
bodies go to Triton untouched. Metadata, config and statistics come from Triton too, with the
Triton name swapped back for the TargetModel the client used (perf_analyzer and tritonclient read these
before inferring, so a metadata or config call on a cold model loads it). The repository extension maps to
the gateway's own lifecycle: load stages and loads through the manager, unload evicts an idle model.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import gateway
from gateway.app import Gateway
from gateway.errors import ModelBusy, ModelNotFound
from gateway.records import State

EXTENSIONS = ["classification", "model_repository", "schedule_policy", "model_configuration", "binary_tensor_data",
              "parameters", "statistics"]
_TRITON_STATES = {State.READY: "READY", State.LOADING: "LOADING", State.UNLOADING: "UNLOADING",
                  State.STAGING: "LOADING"}


def _renamed(body: bytes, key: str, triton_name: str) -> Any:
    """Triton's JSON with every occurrence of the internal model name replaced by the TargetModel."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (key if k == "name" and v == triton_name else walk(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(json.loads(body))


def routes(gw: Gateway) -> list[Route]:
    manager, proxy = gw.manager, gw.proxy

    async def from_triton(request: Request, suffix: str) -> Response:
        """GET a model resource from Triton after making sure the model is loaded."""
        key, version = request.path_params["model"], request.path_params.get("version")
        rec = await manager.ensure_ready(key)
        path = f"/v2/models/{rec.name}" + (f"/versions/{version}" if version else "") + suffix
        answer = await proxy.request("GET", path)
        if answer.status != 200:
            return Response(answer.body, status_code=answer.status, headers=answer.headers)
        return JSONResponse(_renamed(answer.body, key, rec.name))

    async def metadata(request: Request) -> Response:
        return await from_triton(request, "")

    async def config(request: Request) -> Response:
        return await from_triton(request, "/config")

    async def stats(request: Request) -> Response:
        return await from_triton(request, "/stats")

    async def ready(request: Request) -> Response:
        """Ready means loaded now; asking does not load (that is what infer and metadata do)."""
        rec = manager.record(request.path_params["model"])
        return Response(status_code=200 if rec is not None and rec.state is State.READY else 400)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "mme-gateway", "version": gateway.__version__, "extensions": EXTENSIONS})

    async def repository_index(request: Request) -> Response:
        body = await request.body()
        ready_only = bool(body) and bool(json.loads(body).get("ready"))
        rows = [
            {"name": rec.model.key, "version": "1", "state": _TRITON_STATES.get(rec.state, "UNAVAILABLE"),
             "reason": rec.error.message if rec.error else ""}
            for rec in manager.records()
            if not ready_only or rec.state is State.READY
        ]
        return JSONResponse(rows)

    async def repository_load(request: Request) -> Response:
        await manager.ensure_ready(request.path_params["model"])
        return Response(status_code=200)

    async def repository_unload(request: Request) -> Response:
        key = request.path_params["model"]
        rec = manager.record(key)
        if rec is None or rec.state is not State.READY:
            raise ModelNotFound(f"model {key!r} is not loaded")
        if not await manager.unload(rec, reason="api"):
            raise ModelBusy(f"model {key!r} is serving requests; retry the unload when it is idle")
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
