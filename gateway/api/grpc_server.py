"""KServe v2 over gRPC (`inference.GRPCInferenceService`), served with `grpc.aio` next to the HTTP edge.

Clients name a TargetModel (a store key such as `cities/Houston_TX.tar.gz`) wherever the protocol takes a
model name; the gateway makes that model ready and talks to Triton under the model's Triton name. What
Triton answers with its own name (metadata, config, statistics, inference responses, error messages) is
rewritten back to the TargetModel, so tritonclient and perf_analyzer find the names they asked for.

- ModelInfer is the hot path. It is registered without a deserializer and forwarded over one pooled
  `grpc.aio` channel as bytes: the request is parsed with upb only to read and rewrite `model_name`
  (about 2.5 us for a small request; a hand-written wire-format splice measured slower in Python), and
  tensors are never decoded into numpy. The answer gets its `model_name` put back the same way (~1 us).
  The lease and this rewriting add ~30 us a request; grpc.aio's own server + client call costs far more
  (a bare raw-bytes grpc.aio proxy measured about the same CPU per request as this edge), so the edge stays
  on uvloop, where grpc.aio measured ~30% cheaper than on the default loop.
- ModelStreamInfer is forwarded as one upstream stream per client stream; the stream holds a lease on each
  model it has used until it closes, so no model is unloaded under an open stream.
- The repository calls are mapped to the gateway's own lifecycle (index: the gateway's records; load:
  `ensure_ready`; unload: `ModelManager.unload`), not to Triton's repository, which holds internal names.
- Server-wide settings of the shared Triton (shared memory, trace, log settings) are refused with
  UNIMPLEMENTED: one client must not change them for every other model's clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gateway.app import Gateway
from gateway.errors import GatewayError, ModelNotFound
from gateway.records import ModelRecord, State

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "kserve_grpc"  # the `protocol` label of mme_requests_total

_CALL_TIMEOUT_S = 10.0  # metadata, config, statistics: Triton answers these from memory
_INFER_TIMEOUT_S = 300.0  # upper bound on one inference when the client sets no deadline
_STREAM_TIMEOUT_S = 3600.0  # upper bound on one ModelStreamInfer stream when the client sets no deadline
_UNLOAD_WAIT_S = 10.0  # how long an unload waits for in-flight requests and loads of that model
_POLL_S = 0.02
_UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# SO_REUSEPORT off: a second gateway on the same port must fail to start, not share the port silently.
_SERVER_OPTIONS = [*_UNLIMITED, ("grpc.so_reuseport", 0)]
# Extensions Triton advertises that the gateway does not serve (see the module docstring).
_HIDDEN_EXTENSIONS = {"system_shared_memory", "cuda_shared_memory", "trace", "logging"}

_GRPC_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    422: grpc.StatusCode.FAILED_PRECONDITION,  # the artifact is unusable until it is replaced in the store
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_HTTP_FOR_GRPC = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TRITON_STATE = {
    State.READY: "READY",
    State.STAGING: "LOADING",
    State.LOADING: "LOADING",
    State.UNLOADING: "UNLOADING",
}  # absent, staged and failed models are not in Triton: UNAVAILABLE

T = TypeVar("T")
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class RpcFailure(Exception):
    """An answer that is a gRPC status: Triton's error (names rewritten) or a refusal of the edge itself."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details

    @classmethod
    def upstream(cls, exc: grpc.aio.AioRpcError, rec: ModelRecord | None = None) -> "RpcFailure":
        details = exc.details() or exc.code().name
        return cls(exc.code(), _rename(details, {rec.name: rec.model.key} if rec is not None else {}))


def grpc_code(exc: GatewayError) -> grpc.StatusCode:
    """The gRPC status for a gateway error: every protocol agrees on what went wrong via its HTTP status."""
    return _GRPC_FOR_HTTP.get(exc.status, grpc.StatusCode.INTERNAL)


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a gRPC outcome counts as in mme_requests_total, so dashboards read alike for all."""
    return _HTTP_FOR_GRPC.get(code, 500)


def _parse(cls: type[Message], raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {cls.__name__}: {exc}") from None


def _rename(text: str, names: dict[str, str]) -> str:
    """Triton's messages name models by their Triton names; clients know them by their TargetModels."""
    for triton_name, key in names.items():
        text = text.replace(triton_name, key)
    return text


def _remaining(context: grpc.aio.ServicerContext, cap_s: float) -> float:
    """The client's deadline, never more than `cap_s`: every upstream wait is bounded."""
    left = context.time_remaining()
    return cap_s if left is None else max(min(left, cap_s), 0.001)


class GrpcEdge:
    """The gateway's gRPC server and its one pooled channel to Triton."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._infer: grpc.aio.UnaryUnaryMultiCallable | None = None
        self._stream: grpc.aio.StreamStreamMultiCallable | None = None
        self._server_metadata: pb.ServerMetadataResponse | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Open the channel to Triton and listen on host:port (inside the running loop: grpc.aio binds to it)."""
        self._channel = grpc.aio.insecure_channel(self.gw.control.grpc_url, options=_UNLIMITED)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # No (de)serializers: bytes in, bytes out; the handlers parse only what they rewrite.
        self._infer = self._channel.unary_unary(f"/{SERVICE}/ModelInfer", _registered_method=True)
        self._stream = self._channel.stream_stream(f"/{SERVICE}/ModelStreamInfer", _registered_method=True)
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        handlers = self._handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            await self._channel.close()
            raise RuntimeError(f"gRPC edge cannot listen on {address}: {exc}") from None
        await server.start()
        self._server, self.port = server, bound
        log.info("grpc.listening", extra={"host": host, "port": bound, "triton_grpc": self.gw.control.grpc_url})
        return bound

    async def stop(self, grace_s: float = 2.0) -> None:
        """Let in-flight calls finish for `grace_s`, then cancel the rest and close the channel."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        log.info("grpc.stopped", extra={"port": self.port})

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        def typed(fn: Handler, request: type[Message]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._guard(fn), request_deserializer=request.FromString,
                response_serializer=lambda message: message.SerializeToString(),
            )

        def unsupported(what: str) -> grpc.RpcMethodHandler:
            async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not available through the gateway: "
                                    "the Triton behind it is shared by every model's clients")
                raise AssertionError("unreachable")
            return grpc.unary_unary_rpc_method_handler(refuse)

        return {
            "ServerLive": typed(self._server_live, pb.ServerLiveRequest),
            "ServerReady": typed(self._server_ready, pb.ServerReadyRequest),
            "ServerMetadata": typed(self._server_metadata_call, pb.ServerMetadataRequest),
            "ModelReady": typed(self._model_ready, pb.ModelReadyRequest),
            "ModelMetadata": typed(self._model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": typed(self._model_config, pb.ModelConfigRequest),
            "ModelStatistics": typed(self._model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": typed(self._repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": typed(self._repository_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": typed(self._repository_unload, pb.RepositoryModelUnloadRequest),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._model_stream_infer),
            **{name: unsupported(f"{name} (shared memory)") for name in (
                "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
                "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister")},
            "TraceSetting": unsupported("TraceSetting"),
            "LogSettings": unsupported("LogSettings"),
        }

    # -- errors and accounting -------------------------------------------------------------------------------

    def _guard(self, fn: Handler) -> Handler:
        """Turn gateway and upstream errors into gRPC statuses with the gateway's message as details."""
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await fn(request, context)
            except (GatewayError, RpcFailure, grpc.aio.AioRpcError) as exc:
                await self._abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._abort_unexpected(context, exc)
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, GatewayError):
            await context.abort(grpc_code(exc), exc.message, trailing_metadata=(("mme-error-code", exc.code),))
        if isinstance(exc, grpc.aio.AioRpcError):
            exc = RpcFailure.upstream(exc)
        assert isinstance(exc, RpcFailure)
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.warning("grpc.upstream_error", extra={"code": exc.code.name, "error": exc.details})
        await context.abort(exc.code, exc.details)

    async def _abort_unexpected(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """A bug, not a client or model problem: log it whole, tell the client only that it happened."""
        log.exception("grpc.unexpected_error", extra={"error": repr(exc)})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal gateway error: {type(exc).__name__}")

    def _count(self, status: int) -> None:
        self.gw.metrics.count_request(PROTOCOL, status)

    def _wait_s(self, context: grpc.aio.ServicerContext) -> float:
        """How long to wait for a model to load: the manager's bound, or less if the client's deadline is nearer."""
        return _remaining(context, self.gw.manager.config.wait_timeout_s)

    # -- server-wide calls -------------------------------------------------------------------------------

    async def _server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.gw.ready)

    async def _server_metadata_call(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        """Triton's name and version (cached: they cannot change), minus the extensions the gateway refuses."""
        if self._server_metadata is None:
            assert self._stub is not None
            answer = await self._stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=_CALL_TIMEOUT_S)
            kept = [e for e in answer.extensions if e not in _HIDDEN_EXTENSIONS]
            self._server_metadata = pb.ServerMetadataResponse(name=answer.name, version=answer.version,
                                                              extensions=kept)
        return self._server_metadata

    # -- model-scoped calls --------------------------------------------------------------------------------

    async def _on_ready(self, key: str, context: grpc.aio.ServicerContext,
                        call: Callable[[str], Awaitable[T]]) -> tuple[T, ModelRecord]:
        """Make `key` ready, then run `call(triton_name)`; load again once if it was unloaded in between
        (these calls hold no lease, like the manager's `ensure_ready`, so an eviction can slip in)."""
        for attempt in (1, 2):
            rec = await self.gw.manager.ensure_ready(key, self._wait_s(context))
            try:
                return await call(rec.name), rec
            except grpc.aio.AioRpcError as exc:
                if attempt == 1 and rec.state is not State.READY:
                    continue
                raise RpcFailure.upstream(exc, rec) from None
        raise AssertionError("unreachable")

    async def _model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """From the gateway's state, without loading: 'ready' means a call now would not wait for a load."""
        rec = self.gw.manager.record(request.name)
        return pb.ModelReadyResponse(ready=rec is not None and rec.state is State.READY)

    async def _model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        assert self._stub is not None
        stub = self._stub
        answer, _ = await self._on_ready(request.name, context, lambda name: stub.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=request.version), timeout=_CALL_TIMEOUT_S))
        answer.name = request.name
        return answer

    async def _model_config(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        assert self._stub is not None
        stub = self._stub
        answer, _ = await self._on_ready(request.name, context, lambda name: stub.ModelConfig(
            pb.ModelConfigRequest(name=name, version=request.version), timeout=_CALL_TIMEOUT_S))
        answer.config.name = request.name
        return answer

    async def _model_statistics(self, request: pb.ModelStatisticsRequest,
                                context: Any) -> pb.ModelStatisticsResponse:
        """One model's statistics (loading it, as perf_analyzer expects), or every gateway model's: models
        Triton holds that the gateway does not know are left out, their internal names mean nothing here."""
        assert self._stub is not None
        stub = self._stub
        if request.name:
            answer, _ = await self._on_ready(request.name, context, lambda name: stub.ModelStatistics(
                pb.ModelStatisticsRequest(name=name, version=request.version), timeout=_CALL_TIMEOUT_S))
            for stats in answer.model_stats:
                stats.name = request.name
            return answer
        keys = {rec.name: rec.model.key for rec in self.gw.manager.records()}
        answer = await stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=_CALL_TIMEOUT_S)
        out = pb.ModelStatisticsResponse()
        for stats in answer.model_stats:
            if stats.name in keys:
                kept = out.model_stats.add()
                kept.CopyFrom(stats)
                kept.name = keys[stats.name]
        return out

    # -- the repository, mapped to the gateway's lifecycle ---------------------------------------------------

    async def _repository_index(self, request: pb.RepositoryIndexRequest,
                                context: Any) -> pb.RepositoryIndexResponse:
        """The models the gateway knows (not the whole store: it may hold thousands), in Triton's states."""
        out = pb.RepositoryIndexResponse()
        for rec in sorted(self.gw.manager.records(), key=lambda r: r.model.key):
            state = _TRITON_STATE.get(rec.state, "UNAVAILABLE")
            if request.ready and state != "READY":
                continue
            reason = rec.error.message if rec.error is not None and rec.state is State.FAILED else ""
            out.models.add(name=rec.model.key, state=state, reason=reason)
        return out

    async def _repository_load(self, request: pb.RepositoryModelLoadRequest,
                               context: Any) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise RpcFailure(grpc.StatusCode.INVALID_ARGUMENT,
                             f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: the "
                             "gateway loads each model from its store as the artifact describes it")
        rec = await self.gw.manager.ensure_ready(request.model_name, self._wait_s(context))
        log.info("grpc.model_load", extra={"model": rec.model.key, "triton_name": rec.name})
        return pb.RepositoryModelLoadResponse()

    async def _repository_unload(self, request: pb.RepositoryModelUnloadRequest,
                                 context: Any) -> pb.RepositoryModelUnloadResponse:
        """Unload once the model's in-flight requests and any load in progress are done (bounded wait)."""
        rec = self.gw.manager.record(request.model_name)
        if rec is None:
            raise ModelNotFound(f"model {request.model_name!r} is not known to the gateway")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _remaining(context, _UNLOAD_WAIT_S)
        while not await self.gw.manager.unload(rec, reason="api"):
            busy = rec.state in _TRITON_STATE or (rec.pipeline is not None and not rec.pipeline.done())
            if not busy:
                break  # not loaded: nothing to do, as Triton answers for a model it does not hold
            if loop.time() > deadline:
                raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION,
                                 f"model {rec.model.key!r} is still serving {rec.leases} request(s) or loading "
                                 f"(state {rec.state.value}) after {_UNLOAD_WAIT_S:.0f}s; retry the unload")
            await asyncio.sleep(_POLL_S)
        log.info("grpc.model_unload", extra={"model": rec.model.key, "state": rec.state.value})
        return pb.RepositoryModelUnloadResponse()

    # -- inference ------------------------------------------------------------------------------------------

    async def _model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Lease the model, forward the request bytes with only `model_name` rewritten, rename the answer."""
        status = 500
        rec: ModelRecord | None = None
        try:
            request = _parse(pb.ModelInferRequest, raw)
            key = request.model_name
            async with self.gw.manager.lease(key, self._wait_s(context)) as rec:
                request.model_name = rec.name
                assert self._infer is not None
                answer = await self._infer(request.SerializeToString(),
                                           timeout=_remaining(context, _INFER_TIMEOUT_S))
            response = pb.ModelInferResponse.FromString(answer)
            response.model_name = key
            status = 200
            return response.SerializeToString()
        except GatewayError as exc:
            status = exc.status
            await self._abort(context, exc)
        except grpc.aio.AioRpcError as exc:
            status = http_status(exc.code())
            await self._abort(context, RpcFailure.upstream(exc, rec))
        except RpcFailure as exc:
            status = http_status(exc.code)
            await self._abort(context, exc)
        except asyncio.CancelledError:
            status = 499  # the client went away (or its deadline passed): nginx's "client closed request"
            raise
        except Exception as exc:
            await self._abort_unexpected(context, exc)
        finally:
            self._count(status)
        raise AssertionError("unreachable")  # abort() raises

    async def _model_stream_infer(self, requests: AsyncIterator[bytes],
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One upstream stream per client stream. Requests the gateway refuses (unknown model, bad key, ...)
        get an error response in the stream, as Triton does, and the stream goes on."""
        assert self._stream is not None
        upstream = self._stream(timeout=_remaining(context, _STREAM_TIMEOUT_S))
        out: asyncio.Queue[bytes | RpcFailure | None] = asyncio.Queue()
        names: dict[str, str] = {}  # Triton name -> TargetModel, to rename the answers
        async with contextlib.AsyncExitStack() as held:
            pump = asyncio.create_task(self._pump(requests, upstream, context, held, names, out))
            relay = asyncio.create_task(self._relay(upstream, names, out))
            try:
                while (item := await out.get()) is not None:
                    if isinstance(item, RpcFailure):
                        await self._abort(context, item)
                    else:
                        yield item
            finally:
                upstream.cancel()
                for task in (pump, relay):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    async def _pump(self, requests: AsyncIterator[bytes], upstream: Any, context: grpc.aio.ServicerContext,
                    held: contextlib.AsyncExitStack, names: dict[str, str],
                    out: asyncio.Queue[bytes | RpcFailure | None]) -> None:
        """Client -> Triton: lease each model on first use in the stream (held until it closes), rename."""
        leased: dict[str, ModelRecord] = {}
        async for raw in requests:
            key, request_id = "", ""
            try:
                request = _parse(pb.ModelInferRequest, raw)
                key, request_id = request.model_name, request.id
                rec = leased.get(key)
                if rec is None:
                    rec = leased[key] = await held.enter_async_context(
                        self.gw.manager.lease(key, self._wait_s(context)))
                    names[rec.name] = key
                request.model_name = rec.name
            except (GatewayError, RpcFailure) as exc:
                self._count(exc.status if isinstance(exc, GatewayError) else http_status(exc.code))
                message = exc.message if isinstance(exc, GatewayError) else exc.details
                refused = pb.ModelStreamInferResponse(error_message=message)
                refused.infer_response.model_name = key
                refused.infer_response.id = request_id
                out.put_nowait(refused.SerializeToString())
                continue
            try:
                await upstream.write(request.SerializeToString())
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the upstream call ended; the relay reports why
            self._count(200)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await upstream.done_writing()

    async def _relay(self, upstream: Any, names: dict[str, str],
                     out: asyncio.Queue[bytes | RpcFailure | None]) -> None:
        """Triton -> client: rename each answer; the end of the upstream stream ends the client's."""
        try:
            async for raw in upstream:
                answer = pb.ModelStreamInferResponse.FromString(raw)
                name = answer.infer_response.model_name
                answer.infer_response.model_name = names.get(name, name)
                if answer.error_message:
                    answer.error_message = _rename(answer.error_message, names)
                out.put_nowait(answer.SerializeToString())
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                out.put_nowait(RpcFailure(exc.code(), _rename(exc.details() or exc.code().name, names)))
        out.put_nowait(None)
