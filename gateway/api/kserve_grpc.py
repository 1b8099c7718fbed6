"""KServe v2 over gRPC (`inference.GRPCInferenceService`), served with `grpc.aio` next to the HTTP edge.

Clients name a TargetModel (a store key such as `cities/Houston_TX.tar.gz`) wherever the protocol takes a
model name; the gateway makes that model ready and talks to Triton under the model's Triton name. What
Triton answers with its own name (metadata, config, statistics, inference responses, error messages) is
rewritten back to the TargetModel, so tritonclient and perf_analyzer find the names they asked for.

- ModelInfer is the hot path. It is registered without a (de)serializer: the data plane reads the request
  in its protobuf wire format (`gateway.grpc_wire`: the name, the declared inputs and the raw tensors'
  lengths, for the checks of `gateway.infer_limits`), rewrites `model_name` in the bytes and forwards them
  (`gateway.triton.grpc`); Triton's answer comes back the same way. The whole message is never parsed,
  only each input's declaration (with its typed contents, if it has any); raw tensors are never decoded,
  and the gateway copies them once each way. The edge runs on uvloop, where grpc.aio measured ~30% cheaper.
- ModelStreamInfer is forwarded as one upstream stream per client stream, each request and answer edited
  in its bytes the same way; each request holds a concurrency slot and a lease on its model from when it
  is sent until its answer comes back, so no model is unloaded under a request in flight and an idle stream
  holds nothing. A request the gateway refuses gets an error answer in the stream (naming its model and id,
  as Triton does) and the stream goes on.
- The repository calls are the data plane's, mapped to the gateway's own lifecycle, not to Triton's
  repository, which holds internal names.
- Server-wide settings of the shared Triton (shared memory, trace, log settings) are refused with
  UNIMPLEMENTED: one client must not change them for every other model's clients.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from gateway.api.grpc_auth import KeyInterceptor, bearer_key
from gateway.dataplane import UNLOAD_WAIT_S, DataPlane, http_status, rename_text
from gateway.errors import Forbidden, GatewayError, ModelBusy, Throttled
from gateway.grpc_wire import WireError, rename_stream_response, renamed, stream_response_model
from gateway.keys import MANAGE, KeyRing
from gateway.records import ModelRecord
from gateway.redact import public
from gateway.triton.grpc import SERVICE, UNLIMITED, TritonRpcError

log = logging.getLogger(__name__)

PROTOCOL = "kserve_grpc"  # the `protocol` label of mme_requests_total

_CALL_TIMEOUT_S = 10.0  # metadata, config, statistics: Triton answers these from memory
_STREAM_TIMEOUT_S = 3600.0  # upper bound on one ModelStreamInfer stream when the client sets no deadline
STREAM_WINDOW = 64  # requests in flight on one stream, and answers queued for a client that reads slowly
_SLOW_READER_S = 30.0  # how long answers may wait for a client that reads none before its stream is ended
# SO_REUSEPORT off: a second gateway on the same port must fail to start, not share the port silently.
_SERVER_OPTIONS = [*UNLIMITED, ("grpc.so_reuseport", 0)]
_FRAMING_BYTES = 1 << 16  # a request message's names, shapes and parameters beside its tensor bytes
# Extensions Triton advertises that the gateway does not serve (see the module docstring).
_HIDDEN_EXTENSIONS = {"system_shared_memory", "cuda_shared_memory", "trace", "logging"}

_GRPC_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    422: grpc.StatusCode.FAILED_PRECONDITION,  # the artifact is unusable until it is replaced in the store
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # what grpc itself answers for a message over the size limit
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def grpc_code(exc: GatewayError) -> grpc.StatusCode:
    """The gRPC status for a gateway error: every protocol agrees on what went wrong via its HTTP status
    (a busy model is a precondition, not an existing name)."""
    if isinstance(exc, ModelBusy):
        return grpc.StatusCode.FAILED_PRECONDITION
    return _GRPC_FOR_HTTP.get(exc.status, grpc.StatusCode.INTERNAL)


def _remaining(context: grpc.aio.ServicerContext, cap_s: float) -> float:
    """The client's deadline, never more than `cap_s`: every upstream wait is bounded."""
    left = context.time_remaining()
    return cap_s if left is None else max(min(left, cap_s), 0.001)


class GrpcEdge:
    """The gateway's gRPC server; Triton is reached through the data plane's gRPC client."""

    def __init__(self, dp: DataPlane, ready: Callable[[], bool], keys: KeyRing | None = None) -> None:
        self.dp = dp
        self._ready = ready
        self._keys = keys if keys is not None and keys.enabled else None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Future[None] | None = None
        self._server_metadata: pb.ServerMetadataResponse | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (inside the running loop: grpc.aio binds to it)."""
        # A message over the request cap is refused by grpc itself (RESOURCE_EXHAUSTED) before it is buffered.
        options = [*(o for o in _SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"),
                   ("grpc.max_receive_message_length", self.dp.max_request_bytes + _FRAMING_BYTES)]
        interceptors = [KeyInterceptor(self._keys)] if self._keys is not None else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        handlers = self._handlers()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        server.add_registered_method_handlers(SERVICE, handlers)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC edge cannot listen on {address}: {exc}") from None
        await server.start()
        self._server, self.port = server, bound
        log.info("grpc.listening", extra={"host": host, "port": bound})
        return bound

    async def stop(self, grace_s: float = 2.0) -> None:
        """Refuse new calls, let in-flight ones finish for `grace_s`, then cancel the rest. Idempotent: a second
        caller waits for the first stop."""
        if self._stopping is None:
            if self._server is None:
                return
            log.info("grpc.draining", extra={"port": self.port, "grace_s": grace_s})
            self._stopping = asyncio.ensure_future(self._server.stop(grace_s))
        await asyncio.shield(self._stopping)
        self._server = None
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
            except (GatewayError, TritonRpcError) as exc:
                await self._abort(context, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self._abort_unexpected(context, exc)
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, GatewayError):
            await context.abort(grpc_code(exc), public(exc.message), trailing_metadata=(("mme-error-code", exc.code),))
        assert isinstance(exc, TritonRpcError)
        if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            log.warning("grpc.upstream_error", extra={"code": exc.code.name, "error": exc.details})
        await context.abort(exc.code, public(exc.details))

    async def _abort_unexpected(self, context: grpc.aio.ServicerContext, exc: Exception) -> None:
        """A bug, not a client or model problem: log it whole, tell the client only that it happened."""
        log.exception("grpc.unexpected_error", extra={"error": repr(exc)})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal gateway error: {type(exc).__name__}")

    def _count(self, status: int) -> None:
        self.dp.metrics.count_request(PROTOCOL, status)

    def _wait_s(self, context: grpc.aio.ServicerContext) -> float:
        """How long to wait for a model to load: the manager's bound, or less if the client's deadline is nearer."""
        return _remaining(context, self.dp.wait_timeout_s)

    # -- server-wide calls -------------------------------------------------------------------------------

    async def _server_live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    async def _server_metadata_call(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        """Triton's name and version (cached: they cannot change), minus the extensions the gateway refuses."""
        if self._server_metadata is None:
            answer = await self.dp.grpc.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=_CALL_TIMEOUT_S)
            kept = [e for e in answer.extensions if e not in _HIDDEN_EXTENSIONS]
            self._server_metadata = pb.ServerMetadataResponse(name=answer.name, version=answer.version,
                                                              extensions=kept)
        return self._server_metadata

    # -- model-scoped calls --------------------------------------------------------------------------------

    async def _model_ready(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """From the gateway's state, without loading: 'ready' means a call now would not wait for a load."""
        return pb.ModelReadyResponse(ready=self.dp.model_ready(request.name))

    async def _model_metadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        stub = self.dp.grpc.stub
        answer = await self.dp.resource_grpc(request.name, lambda name: stub.ModelMetadata(
            pb.ModelMetadataRequest(name=name, version=request.version), timeout=_CALL_TIMEOUT_S), self._wait_s(context))
        answer.name = request.name
        return answer

    async def _model_config(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        stub = self.dp.grpc.stub
        answer = await self.dp.resource_grpc(request.name, lambda name: stub.ModelConfig(
            pb.ModelConfigRequest(name=name, version=request.version), timeout=_CALL_TIMEOUT_S), self._wait_s(context))
        answer.config.name = request.name
        return answer

    async def _model_statistics(self, request: pb.ModelStatisticsRequest,
                                context: Any) -> pb.ModelStatisticsResponse:
        """One model's statistics (loading it, as perf_analyzer expects), or every gateway model's: models
        Triton holds that the gateway does not know are left out, their internal names mean nothing here."""
        stub = self.dp.grpc.stub
        if request.name:
            answer = await self.dp.resource_grpc(request.name, lambda name: stub.ModelStatistics(
                pb.ModelStatisticsRequest(name=name, version=request.version), timeout=_CALL_TIMEOUT_S),
                self._wait_s(context))
            for stats in answer.model_stats:
                stats.name = request.name
            return answer
        if self._keys is not None:  # every model at once is a listing, as the repository index is
            key, _ = bearer_key(self._keys, context.invocation_metadata())
            if key is None or MANAGE not in key.scopes:
                raise Forbidden("statistics for every model (an empty model name) need the 'manage' scope; "
                                "name a model to read its statistics with 'invoke'")
        keys = self.dp.names()
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
        out = pb.RepositoryIndexResponse()
        for row in self.dp.index(request.ready):
            out.models.add(name=row.key, version="1", state=row.state, reason=row.reason)
        return out

    async def _repository_load(self, request: pb.RepositoryModelLoadRequest,
                               context: Any) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise TritonRpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"load parameters ({', '.join(sorted(request.parameters))}) are not supported: the "
                                 "gateway loads each model from its store as the artifact describes it")
        await self.dp.load(request.model_name, self._wait_s(context))
        return pb.RepositoryModelLoadResponse()

    async def _repository_unload(self, request: pb.RepositoryModelUnloadRequest,
                                 context: Any) -> pb.RepositoryModelUnloadResponse:
        await self.dp.unload(request.model_name, _remaining(context, UNLOAD_WAIT_S))
        return pb.RepositoryModelUnloadResponse()

    # -- inference ------------------------------------------------------------------------------------------

    async def _model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """The serialized request goes to the data plane as it came (it scans, checks, leases, forwards and
        counts, malformed requests included); this edge turns errors into statuses."""
        try:
            return await self.dp.infer_grpc(raw, PROTOCOL, _remaining(context, self.dp.infer_timeout_s),
                                            self._wait_s(context))
        except (GatewayError, TritonRpcError) as exc:
            await self._abort(context, exc)
        except Exception as exc:
            await self._abort_unexpected(context, exc)
        raise AssertionError("unreachable")  # abort() raises

    async def _model_stream_infer(self, requests: AsyncIterator[bytes],
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """One upstream stream per client stream. Requests the gateway refuses (unknown model, bad key, ...)
        get an error response in the stream, as Triton does, and the stream goes on. What a stream holds is
        bounded: a request's slot and lease from when it is sent until its answer comes back (see `_Held`),
        at most `STREAM_WINDOW` requests in flight, and at most as many answers queued for a slow reader."""
        upstream = self.dp.grpc.stream(_remaining(context, _STREAM_TIMEOUT_S))
        out: asyncio.Queue[bytes | TritonRpcError | None] = asyncio.Queue(STREAM_WINDOW)
        held = _Held(STREAM_WINDOW)
        pump = asyncio.create_task(self._pump(requests, upstream, context, held, out))
        relay = asyncio.create_task(self._relay(upstream, held, out))
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, TritonRpcError):
                    await self._abort(context, item)
                else:
                    yield item
        finally:
            upstream.cancel()
            for task in (pump, relay):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await held.release_all()

    async def _pump(self, requests: AsyncIterator[bytes], upstream: Any, context: grpc.aio.ServicerContext,
                    held: _Held, out: asyncio.Queue[bytes | TritonRpcError | None]) -> None:
        """Client -> Triton: scan and check each request as the unary call does, take a slot and a lease for it
        (released when its answer comes back), rename."""
        async for raw in requests:
            key, request_id = "", ""
            try:
                request = await self.dp.checks.grpc(raw)
                key, request_id = request.model_name, request.id
                rec = await held.take(self.dp.holding(key, self._wait_s(context)))
                forward = renamed(raw, request, rec.name)
            except (GatewayError, TritonRpcError) as exc:
                self._count(exc.status if isinstance(exc, GatewayError) else http_status(exc.code))
                key = getattr(exc, "model_name", key)  # a refused request's own, when it could be read
                request_id = getattr(exc, "request_id", request_id)
                message = exc.message if isinstance(exc, GatewayError) else exc.details
                refused = pb.ModelStreamInferResponse(error_message=public(message))
                refused.infer_response.model_name = key
                refused.infer_response.id = request_id
                await out.put(refused.SerializeToString())
                continue
            try:
                await upstream.write(forward)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return  # the upstream call ended; the relay reports why
            self._count(200)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await upstream.done_writing()

    async def _relay(self, upstream: Any, held: _Held, out: asyncio.Queue[bytes | TritonRpcError | None]) -> None:
        """Triton -> client: rename each answer in its bytes (its error message, when it has one, renamed and
        made public too) and release what its request held; the end of the upstream stream ends the client's.
        Waits for room in `out`, so a client that stops reading stops the relay, and Triton's stream with it."""
        def error(message: str) -> str:
            return public(rename_text(message, held.names))

        async def put(item: bytes | TritonRpcError | None) -> None:
            if not out.full():
                out.put_nowait(item)
                return
            try:
                await asyncio.wait_for(out.put(item), _SLOW_READER_S)
            except asyncio.TimeoutError:  # the client stopped reading: end the stream, free what it held
                upstream.cancel()
                await held.close()
                while not out.empty():
                    out.get_nowait()
                out.put_nowait(TritonRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    f"the client read no answer for {_SLOW_READER_S:.0f}s while {STREAM_WINDOW} waited; the "
                    "stream was ended")))
                raise

        try:
            async for raw in upstream:
                await held.answered(stream_response_model(raw))
                await put(rename_stream_response(raw, held.names, error))
        except asyncio.TimeoutError:
            return
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                with contextlib.suppress(asyncio.TimeoutError):
                    await put(TritonRpcError(exc.code(), error(exc.details() or exc.code().name)))
        except WireError as exc:  # not Triton as we know it: end the stream rather than pass on what we cannot read
            log.warning("grpc.malformed_stream_answer", extra={"error": str(exc)})
            with contextlib.suppress(asyncio.TimeoutError):
                await put(TritonRpcError(grpc.StatusCode.INTERNAL, "the gateway could not read an answer from "
                                         f"Triton (malformed ModelStreamInferResponse: {exc})"))
        with contextlib.suppress(asyncio.TimeoutError):
            await put(None)


class _Held:
    """What one ModelStreamInfer stream holds for its requests in flight: each request's concurrency slot and
    lease (`DataPlane.holding`), taken when it is sent and released when an answer for its model comes back,
    so an idle stream holds nothing (it held a slot and a lease per model for up to an hour before).

    Answers are matched to requests by model, oldest first; an answer naming no model releases the oldest
    request. A decoupled model that answers a request more than once releases other requests early, and one
    that never answers keeps its hold until the stream closes: both bounded by the window of requests in
    flight."""

    def __init__(self, window: int) -> None:
        self._closed = False
        self._window = asyncio.Semaphore(window)
        self._inflight: collections.deque[tuple[str, AbstractAsyncContextManager[ModelRecord]]] = collections.deque()
        self.names: dict[str, str] = {}  # Triton name -> TargetModel, to rename the answers

    async def take(self, holding: AbstractAsyncContextManager[ModelRecord]) -> ModelRecord:
        await self._window.acquire()
        try:
            if self._closed:
                raise Throttled("the stream is ending; open a new one")
            rec = await holding.__aenter__()
        except BaseException:
            self._window.release()
            raise
        if self._closed:  # ended while this request waited for its model
            await self._release(holding)
            raise Throttled("the stream is ending; open a new one")
        self.names[rec.name] = rec.model.key
        self._inflight.append((rec.name, holding))
        return rec

    async def answered(self, triton_name: str) -> None:
        if not self._inflight:
            return
        for entry in self._inflight:
            if entry[0] == triton_name:
                self._inflight.remove(entry)
                break
        else:
            entry = self._inflight.popleft()
        await self._release(entry[1])

    async def close(self) -> None:
        """Release everything now and take nothing more (the stream is ending)."""
        self._closed = True
        await self.release_all()

    async def release_all(self) -> None:
        while self._inflight:
            await self._release(self._inflight.popleft()[1])

    async def _release(self, holding: AbstractAsyncContextManager[ModelRecord]) -> None:
        try:
            await holding.__aexit__(None, None, None)
        finally:
            self._window.release()
