"""The HTTP application: every HTTP edge's routes on one Starlette app, KServe inference in front of it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from starlette.applications import Starlette

from gateway.api import kserve_http, ops, sagemaker_container, sagemaker_runtime
from gateway.api.errors import handle_gateway_error, handle_unexpected
from gateway.api.fastpath import InferFastPath
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError
from gateway.manager import ModelManager
from gateway.metrics import Metrics


def build_app(dp: DataPlane, manager: ModelManager, metrics: Metrics, store_url: str, ready: Callable[[], bool],
              lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
              container: sagemaker_container.ContainerApi | None = None) -> InferFastPath:
    """`manager` serves the container API's registrations (None: the API is off); everything else goes
    through the data plane."""
    invoker = sagemaker_runtime.Invoker(dp)
    app = Starlette(
        routes=[*kserve_http.health_routes(ready), *ops.routes(metrics), *sagemaker_runtime.routes(invoker),
                *sagemaker_container.routes(dp, manager, invoker, store_url, ready, container), *kserve_http.routes(dp)],
        lifespan=lifespan,
        exception_handlers={GatewayError: handle_gateway_error, Exception: handle_unexpected},
    )
    return InferFastPath(app, dp)
