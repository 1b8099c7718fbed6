"""The SageMaker multi-model container API, so the image runs as a bring-your-own container behind SageMaker.

Off unless `--container-api`: it loads models from local paths, so it is served only where asked for, only
to `manage` keys (see `gateway.api.guard`), and only from under `--container-api-root` (SageMaker's
`/opt/ml/models`). Registered names are their own namespace: `/models/{name}/invoke` reaches them, while
KServe and the runtime API always mean the store's key; a name that is a store key is refused with 409.

`GET /ping`; `POST /models {"model_name", "url"}` (200; 409 already loaded; 404 no such url; 507 no memory;
422 unusable artifact); `GET /models?next_page_token=&max_results=` (registered models, then the store
models the gateway knows, each with its state; `page_size` is accepted for `max_results`);
`GET /models/{name}`; `DELETE /models/{name}` (404 when not loaded); `POST /models/{name}/invoke` (the same
body handling as /invocations; errors keep the gateway's own statuses, which SageMaker wraps itself).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.sagemaker_runtime import CUSTOM_ATTRIBUTES_HEADER, Invoker
from gateway.api.views import describe
from gateway.dataplane import DataPlane
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.extract import ExtractLimits
from gateway.manager import ModelManager
from gateway.records import ModelRecord, State
from gateway.store.path import PathSource, resolve_under

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True)
class ContainerApi:
    """Where the container API may load from, and the caps a registered directory is packed under."""

    root: Path
    limits: ExtractLimits


def routes(dp: DataPlane, manager: ModelManager, invoker: Invoker, store_url: str,
           ready: Callable[[], bool], container: ContainerApi | None) -> list[Route]:
    async def ping(request: Request) -> Response:
        healthy = ready()
        return JSONResponse({"status": "Healthy" if healthy else "Unhealthy"}, status_code=200 if healthy else 503)

    async def off(request: Request) -> Response:
        raise ModelNotFound("the SageMaker container API (/models) is off on this gateway; it is served with "
                            "--container-api")

    if container is None:
        return [Route("/ping", ping, methods=["GET"]),
                Route("/models", off, methods=["GET", "POST"]),
                Route("/models/{name:path}", off, methods=["GET", "POST", "DELETE"])]

    # -- the multi-model container API --

    def model_url(rec: ModelRecord, registered: bool) -> str | None:
        """The `url` a registered model was loaded from (as the caller gave it); the store key's URL else."""
        if registered:
            return urls.get(rec.name)
        return f"{store_url.split('@', 1)[0].rstrip('/')}/{rec.model.key}"  # not the S3 endpoint's address

    urls: dict[str, str] = {}  # Triton name -> the url its registration named

    def entry(name: str, rec: ModelRecord, registered: bool, now: float) -> dict[str, Any]:
        details = {k: v for k, v in describe(rec, now).items() if k != "modelName"}
        return {"modelName": name, "modelUrl": model_url(rec, registered), "registered": registered, **details}

    def catalogue() -> list[tuple[tuple[str, int], str, ModelRecord, bool]]:
        """Every model, sorted: registered ones (kind 0) and the store's (kind 1); the sort key pages."""
        registered = manager.registered()
        taken = {rec.name for rec in registered.values()}
        items = [((name, 0), name, rec, True) for name, rec in registered.items()]
        items += [((rec.model.key, 1), rec.model.key, rec, False)
                  for rec in manager.records() if rec.name not in taken]
        return sorted(items, key=lambda item: item[0])

    def lookup(name: str) -> tuple[ModelRecord, bool] | None:
        """A registered model by name, else a store model the gateway knows by its key."""
        registered = manager.registered()
        if name in registered:
            return registered[name], True
        taken = {rec.name for rec in registered.values()}
        store = [rec for rec in manager.records() if rec.model.key == name and rec.name not in taken]
        return (store[0], False) if store else None

    async def list_models(request: Request) -> Response:
        params = request.query_params
        size_text = params.get("max_results") or params.get("page_size") or str(DEFAULT_PAGE_SIZE)
        try:
            size = int(size_text)
        except ValueError:
            raise InvalidRequest(f"max_results {size_text!r} is not an integer") from None
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidRequest(f"max_results must be between 1 and {MAX_PAGE_SIZE}, not {size}")
        after = _decode_token(params.get("next_page_token"))
        items = [item for item in catalogue() if after is None or item[0] > after]
        page, rest = items[:size], items[size:]
        now = time.monotonic()
        body: dict[str, Any] = {"models": [entry(name, rec, reg, now) for _, name, rec, reg in page]}
        if rest:
            body["nextPageToken"] = _encode_token(page[-1][0])
        return JSONResponse(body)

    async def load_model(request: Request) -> Response:
        try:
            spec = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise InvalidRequest(f"the body is not JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise InvalidRequest('the body must be a JSON object {"model_name": ..., "url": ...}')
        name, url = spec.get("model_name"), spec.get("url")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("model_name is missing or not a string")
        if not isinstance(url, str) or not url:
            raise InvalidRequest("url is missing or not a string")
        path = resolve_under(container.root, url, name)
        rec = await manager.register(name, PathSource(path, container.limits))
        urls[rec.name] = url
        log.info("sagemaker.model_registered", extra={"model": name, "url": url, "path": str(path)})
        return JSONResponse(entry(name, rec, True, time.monotonic()))

    async def get_model(request: Request) -> Response:
        name = request.path_params["name"]
        found = lookup(name)
        if found is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        return JSONResponse(entry(name, found[0], found[1], time.monotonic()))

    async def delete_model(request: Request) -> Response:
        name = request.path_params["name"]
        registered = manager.registered().get(name)
        if registered is not None:
            await manager.deregister(name)
            urls.pop(registered.name, None)
            return JSONResponse({"modelName": name, "status": "unloaded"})
        found = lookup(name)
        if found is None or found[0].state is not State.READY:
            raise ModelNotFound(f"model {name!r} is not loaded")
        await dp.unload(name)
        return JSONResponse({"modelName": name, "status": "unloaded"})

    async def invoke_model(request: Request) -> Response:
        """The container API's invoke: registered names only; errors keep the gateway's statuses."""
        name = request.path_params["name"]
        model = manager.registered_model(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} is not loaded")
        custom = request.headers.get(CUSTOM_ATTRIBUTES_HEADER)
        answer = await invoker.invoke(name, await request.body(), request.headers, "sagemaker_container", model)
        headers = {CUSTOM_ATTRIBUTES_HEADER: custom} if custom is not None and answer.status < 400 else None
        return Response(answer.body, status_code=answer.status, headers=headers, media_type=answer.content_type)

    return [
        Route("/ping", ping, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/models", load_model, methods=["POST"]),
        # `{name:path}` is greedy: the `/invoke` route comes first so a name never swallows the suffix.
        Route("/models/{name:path}/invoke", invoke_model, methods=["POST"]),
        Route("/models/{name:path}", get_model, methods=["GET"]),
        Route("/models/{name:path}", delete_model, methods=["DELETE"]),
    ]


def _encode_token(position: tuple[str, int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode().rstrip("=")


def _decode_token(token: str | None) -> tuple[str, int] | None:
    if not token:
        return None
    try:
        name, kind = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if not isinstance(name, str) or kind not in (0, 1):
            raise ValueError(token)
        return name, kind
    except (ValueError, TypeError, binascii.Error):
        raise InvalidRequest(f"next_page_token {token!r} is not a token this gateway issued") from None
