"""The router's gRPC side: `inference.GRPCInferenceService` forwarded as bytes, one channel per instance.

Every method is registered without (de)serializers. The TargetModel is read from the request's model-name
field in the wire format (`gateway.grpc_wire`), so tensors are never parsed; the client's
metadata (`authorization` included) and deadline go upstream, and the instance's status, details and
trailing metadata come back. ServerLive and ServerReady are the router's own answers; ModelStreamInfer
goes, whole, to the instance its first request's model routes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
from tritonclient.grpc import service_pb2 as pb

from gateway.grpc_wire import WireError, string_field
from gateway.router.fleet import Fleet, Instance
from gateway.router.metrics import RouterMetrics
from gateway.router.table import ConnectFailed, NoInstance, RoutingTable
from gateway.triton.grpc import SERVICE, UNLIMITED

log = logging.getLogger(__name__)

PROTOCOL = "kserve_grpc"
# Which field of each request names the model (all strings); absent methods name none.
MODEL_FIELD = {"ModelInfer": 1, "ModelStreamInfer": 1, "ModelReady": 1, "ModelMetadata": 1, "ModelConfig": 1,
               "ModelStatistics": 1, "RepositoryModelLoad": 2, "RepositoryModelUnload": 2}
_LEARNS = {"ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelConfig", "ModelStatistics",
           "RepositoryModelLoad"}
_CHANNEL_OPTIONS = [*UNLIMITED, ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000),
                    ("grpc.min_reconnect_backoff_ms", 200)]
_STREAM_TIMEOUT_S = 3600.0  # bound on one ModelStreamInfer stream without a client deadline, as the gateway's
_NOT_FORWARDED = ("user-agent", "content-type", "te", "host")


def model_field(raw: bytes, number: int) -> str | None:
    """The model a serialized request names in field `number` (as the gateway will read it: the last
    occurrence), None when absent or unreadable."""
    try:
        return string_field(raw, number) or None
    except WireError:
        return None


def forwarded_metadata(context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple((k, v) for k, v in (context.invocation_metadata() or ())
                 if not k.startswith((":", "grpc-")) and k not in _NOT_FORWARDED)


def _trailing(exc: grpc.aio.AioRpcError) -> tuple[tuple[str, Any], ...]:
    """The instance's trailing metadata (its `mme-error-code`), as the tuple `abort` takes."""
    return tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if not k.startswith(("grpc-", ":")))


def _connect_failure(exc: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the channel itself (no instance answered), not an instance's own 503."""
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    if any(k == "mme-error-code" for k, _ in (exc.trailing_metadata() or ())):
        return False
    details = (exc.details() or "").lower()
    return "failed to connect" in details or "connection refused" in details


class GrpcForwarder:
    def __init__(self, table: RoutingTable, fleet: Fleet, metrics: RouterMetrics, timeout_s: float,
                 max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.table = table
        self.fleet = fleet
        self.metrics = metrics
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    # -- channels ---------------------------------------------------------------------------------------------

    def channel(self, instance: Instance) -> grpc.aio.Channel:
        found = self._channels.get(instance.name)
        if found is None:
            found = self._channels[instance.name] = grpc.aio.insecure_channel(instance.grpc_target,
                                                                               options=_CHANNEL_OPTIONS)
        return found

    def drop_channel(self, instance: Instance) -> None:
        """A new channel for an instance that came back or left: the old one may sit in reconnect backoff."""
        old = self._channels.pop(instance.name, None)
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        # SO_REUSEPORT off: a second router on the same port must fail to start, not share it silently.
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.max_message_bytes),
                                          ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for name in (f.name for f in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods):
            if name == "ModelStreamInfer":
                handlers[name] = grpc.stream_stream_rpc_method_handler(self._stream)
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(self._unary_for(name))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"router gRPC cannot listen on {address}: {exc}") from None
        await server.start()
        self._server = server
        log.info("router.grpc_listening", extra={"host": host, "port": self.port})
        return self.port

    async def stop(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # -- unary calls -------------------------------------------------------------------------------------------

    def _unary_for(self, method: str) -> Any:
        path = f"/{SERVICE}/{method}"
        field = MODEL_FIELD.get(method)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if method == "ServerLive":
                return bytes(pb.ServerLiveResponse(live=True).SerializeToString())
            if method == "ServerReady":
                return bytes(pb.ServerReadyResponse(ready=bool(self.fleet.healthy())).SerializeToString())
            started = time.perf_counter()
            model = model_field(request, field) if field else None
            metadata = forwarded_metadata(context)
            left = context.time_remaining()
            timeout = self.timeout_s if left is None else max(min(left, self.timeout_s), 0.001)

            async def attempt(instance: Instance) -> bytes:
                call = self.channel(instance).unary_unary(path)(request, timeout=timeout, metadata=metadata)
                try:
                    return bytes(await call)
                except grpc.aio.AioRpcError as exc:
                    if _connect_failure(exc):
                        raise ConnectFailed(exc.details() or "unavailable") from exc
                    raise

            try:
                if method == "RepositoryModelUnload" and model is not None:
                    instance, answer = await self._unload_everywhere(model, attempt)
                else:
                    instance, answer = await self.table.forward(model, attempt)
            except NoInstance as exc:
                self._done("no_instance", grpc.StatusCode.UNAVAILABLE, started)
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc),
                                    trailing_metadata=(("mme-error-code", "NoHealthyInstance"),))
            except grpc.aio.AioRpcError as exc:
                self._done(None, exc.code(), started)
                await context.abort(exc.code(), exc.details() or "", trailing_metadata=_trailing(exc))
            if method in _LEARNS:
                self.table.learned(instance, model)
            self._done(None, grpc.StatusCode.OK, started)
            return answer

        return handle

    async def _unload_everywhere(self, model: str, attempt: Callable[[Instance], Awaitable[bytes]]
                                 ) -> tuple[Instance, bytes]:
        """Every copy goes (as over HTTP): the first error other than NOT_FOUND, else a success, else NOT_FOUND."""
        results = await self.table.broadcast(attempt)
        failures = [r for _, r in results if isinstance(r, BaseException) and not isinstance(r, ConnectFailed)]
        for failure in failures:
            if not (isinstance(failure, grpc.aio.AioRpcError) and failure.code() is grpc.StatusCode.NOT_FOUND):
                raise failure
        done = [(i, r) for i, r in results if isinstance(r, bytes)]
        for instance, _ in done:
            self.table.forgot(instance, model)
        if done:
            return done[0]
        if failures:
            raise failures[0]
        raise NoInstance(f"no gateway instance took the unload of {model}")

    def _done(self, error: str | None, code: grpc.StatusCode, started: float) -> None:
        if error is not None:
            self.metrics.errors.labels(error).inc()
        self.metrics.requests.labels(PROTOCOL, code.name).inc()
        self.metrics.latency.labels(PROTOCOL).observe(time.perf_counter() - started)

    # -- the stream ----------------------------------------------------------------------------------------------

    async def _stream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """The whole stream goes where its first request's model routes (an instance serves any model). It
        lasts at most the client's deadline or `_STREAM_TIMEOUT_S`, its wait for the first request included:
        a client that opens streams and sends nothing holds none of them for ever."""
        left = context.time_remaining()
        timeout = _STREAM_TIMEOUT_S if left is None else max(min(left, _STREAM_TIMEOUT_S), 0.001)
        ends = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                first = await anext(aiter(requests), None)
        except TimeoutError:
            self.metrics.errors.labels("timeout").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"the stream sent no request within {timeout:g} s")
        if first is None:
            return
        model = model_field(first, 1)
        metadata = forwarded_metadata(context)
        timeout = max(ends - time.monotonic(), 0.001)
        try:
            instance, reason = self.table.pick(model, set())
        except NoInstance as exc:
            self.metrics.errors.labels("no_instance").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        self.metrics.decision(reason.value)
        instance.outstanding += 1
        self.metrics.outstanding.labels(instance.name).inc()
        upstream = self.channel(instance).stream_stream(f"/{SERVICE}/ModelStreamInfer")(
            timeout=timeout, metadata=metadata)

        async def pump() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                await upstream.write(first)
                async for raw in requests:
                    await upstream.write(raw)
                await upstream.done_writing()

        writer = asyncio.create_task(pump())
        try:
            async for answer in upstream:
                yield answer
            self.table.learned(instance, model)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self.metrics.errors.labels("upstream").inc()
                await context.abort(exc.code(), exc.details() or "", trailing_metadata=_trailing(exc))
        finally:
            upstream.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            instance.outstanding -= 1
            self.metrics.outstanding.labels(instance.name).dec()
