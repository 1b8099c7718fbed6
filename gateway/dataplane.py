"""The one data plane under every protocol edge: inference, model resources and the repository.

Edges (KServe v2 HTTP and gRPC, the SageMaker runtime and container APIs) parse requests and shape answers;
everything between is here, once: the concurrent-invocation cap, the lease on the model, forwarding to
Triton, putting the client's TargetModel back wherever Triton wrote its internal name (answers and errors
alike), and counting each request by protocol and status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
from collections import OrderedDict
from contextlib import AbstractAsyncContextManager
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    ModelBusy,
    ModelNotFound,
    ModelNotReady,
    ModelUnhealthy,
    Throttled,
    UpstreamTimeout,
)
from gateway.grpc_wire import rename, renamed
from gateway.infer_limits import shown
from gateway.manager import Lease, ModelManager
from gateway.naming import ModelKey
from gateway.metrics import Metrics
from gateway.records import ModelRecord, State
from gateway.redact import public
from gateway.request_checks import RequestChecker
from gateway.triton.grpc import TritonGrpc, TritonRpcError
from gateway.triton.http import Body, Forwarded, TritonHttp

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)

_HEADER_LENGTH = "inference-header-content-length"
_UNKNOWN_MODEL = b"unknown model"  # Triton's words for a model it does not have loaded
_STUB_DIED = re.compile(rb"[Ss]tub process.{0,200}(not healthy|unhealthy|died|exited|terminated)")
_METADATA_CACHE_SIZE = 1024
_VERSION = re.compile(r"[0-9]{1,19}")  # Triton's model versions are int64 numbers; nothing else reaches its path
UNLOAD_WAIT_S = 10.0  # how long an unload waits for the model's requests and load in progress to end
_POLL_S = 0.02
TRITON_STATES = {State.READY: "READY", State.STAGING: "LOADING", State.LOADING: "LOADING",
                 State.UNLOADING: "UNLOADING"}  # absent, staged and failed models are not in Triton: UNAVAILABLE


# -- names: clients know TargetModels, Triton knows its internal names --------------------------------------


def rename_text(text: str, names: Mapping[str, str]) -> str:
    """Every internal name in a message (Triton's errors name models) replaced by its TargetModel."""
    for triton_name, key in names.items():
        text = text.replace(triton_name, key)
    return text


@functools.lru_cache(maxsize=4096)
def _name_fields(triton_name: str, key: str) -> tuple[bytes, bytes]:
    """`"model_name":"<internal>"` as Triton writes it, and the same field naming the TargetModel."""
    return b'"model_name":"' + triton_name.encode() + b'"', b'"model_name":' + json.dumps(key).encode()


def restore_model_name(answer: Forwarded, triton_name: str, key: str) -> Forwarded:
    """Put the client's TargetModel back where Triton wrote its internal name.

    A successful answer: only `"model_name":"..."` in the JSON header (the whole body for JSON, the first
    Inference-Header-Content-Length bytes for binary tensors, whose length header is updated); tensor
    bytes are never looked at. An error: every mention in its text. Compressed answers pass as they are.
    """
    if "content-encoding" in answer.headers:
        return answer
    if answer.status >= 400:
        text = answer.body.replace(triton_name.encode(), key.encode()).decode("utf-8", "replace")
        return Forwarded(answer.status, answer.headers, public_error_body(text).encode())
    needle, replacement = _name_fields(triton_name, key)
    header_length = answer.headers.get(_HEADER_LENGTH)
    if header_length is None:
        return Forwarded(answer.status, answer.headers, answer.body.replace(needle, replacement, 1))
    n = int(header_length)
    head = answer.body[:n].replace(needle, replacement, 1)
    if len(head) == n:
        return answer
    rest = memoryview(answer.body)[n:]  # the tensors: copied once, into the answer, not sliced first
    return Forwarded(answer.status, {**answer.headers, _HEADER_LENGTH: str(len(head))}, b"".join((head, rest)))


def public_error_body(text: str) -> str:
    """Triton's error answer (`{"error": "..."}`) with its message made public; other text likewise."""
    try:
        document = json.loads(text)
    except ValueError:
        return public(text)
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        document["error"] = public(document["error"])
        return json.dumps(document)
    return public(text)


def rename_json(document: Any, triton_name: str, key: str) -> Any:
    """Triton's JSON (metadata, config, statistics) with the internal name replaced wherever a string holds
    it (Triton also derives names from it: instance groups are `<name>_0`)."""
    if isinstance(document, dict):
        return {k: rename_json(v, triton_name, key) for k, v in document.items()}
    if isinstance(document, list):
        return [rename_json(v, triton_name, key) for v in document]
    if isinstance(document, str) and triton_name in document:
        return document.replace(triton_name, key)
    return document


def rename_message(message: Message, triton_name: str, key: str) -> None:
    """The same for a protobuf answer, in place: every string field, however deep, maps included."""
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry_value = field.message_type.fields_by_name["value"]
            for item in value.values():
                if entry_value.message_type is not None:
                    rename_message(item, triton_name, key)
        elif field.message_type is not None:
            for item in (value if field.label == field.LABEL_REPEATED else [value]):
                rename_message(item, triton_name, key)
        elif field.type == field.TYPE_STRING:
            if field.label == field.LABEL_REPEATED:
                value[:] = [v.replace(triton_name, key) for v in value]
            elif triton_name in value:
                setattr(message, field.name, value.replace(triton_name, key))


def model_path(triton_name: str, version: str | None, suffix: str = "") -> str:
    """Triton's HTTP path for a model (and version): the version must be a number, since it is written into
    the request line (a CR/LF in it would inject headers into a pooled connection and hang the model)."""
    if version is None:
        return f"/v2/models/{triton_name}{suffix}"
    if not _VERSION.fullmatch(version):
        raise InvalidRequest(f"model version {shown(version)} is not a version number (digits only)")
    return f"/v2/models/{triton_name}/versions/{version}{suffix}"


def upstream_error(exc: grpc.aio.AioRpcError, names: Mapping[str, str]) -> TritonRpcError:
    return TritonRpcError(exc.code(), rename_text(exc.details() or exc.code().name, names))


_HTTP_FOR_GRPC = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status a gRPC outcome counts as in mme_requests_total, so dashboards read alike for all."""
    return _HTTP_FOR_GRPC.get(code, 500)


# -- the data plane ----------------------------------------------------------------------------------------


class Outcome:
    """Counts one request in mme_requests_total when its block ends: with the status the edge set, a gateway
    error's own status, or 499 when the client went away. A plain (synchronous) context manager: it sits on
    the hot path, where each generator-based layer costs microseconds."""

    __slots__ = ("metrics", "protocol", "status")

    def __init__(self, metrics: Metrics, protocol: str) -> None:
        self.metrics, self.protocol, self.status = metrics, protocol, 500

    def __enter__(self) -> Outcome:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, GatewayError):
            self.status = exc.status
        elif isinstance(exc, asyncio.CancelledError):
            self.status = 499  # nginx's "client closed request"
        self.metrics.count_request(self.protocol, self.status)


class Watch:
    """Around a request waiting on Triton: past --infer-timeout the model is treated as hung and healed
    (`ModelManager.heal`), which ends every other request waiting on it too, each with a 503 "retry". A plain
    context manager with slots: it is on the hot path."""

    __slots__ = ("manager", "rec", "key", "timeout_s", "task", "ours")

    def __init__(self, manager: ModelManager, rec: ModelRecord, key: str, timeout_s: float,
                 ours: bool = True) -> None:
        self.manager, self.rec, self.key, self.timeout_s, self.ours = manager, rec, key, timeout_s, ours
        self.task: asyncio.Task[object] | None = None

    def __enter__(self) -> Watch:
        self.task = asyncio.current_task(self.manager.loop)
        self.rec.inflight.add(self.task)  # type: ignore[arg-type]
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        rec, task = self.rec, self.task
        rec.inflight.discard(task)  # type: ignore[arg-type]
        if exc is None:
            return
        if isinstance(exc, UpstreamTimeout) or self.timed_out(exc):
            if self.ours:  # our own bound, not a shorter deadline of the client's
                self.manager.heal(rec, "timeout")
            raise UpstreamTimeout(f"model {self.key!r} did not answer within {self.timeout_s:.0f}s "
                                  "(--infer-timeout); it is being restarted") from None
        if isinstance(exc, asyncio.CancelledError) and task in rec.healed:
            rec.healed.discard(task)  # type: ignore[arg-type]
            task.uncancel()  # type: ignore[union-attr]
            raise ModelUnhealthy(f"model {self.key!r} stopped answering (its process hung or died); it is being "
                                 "restarted, retry shortly") from None

    @staticmethod
    def timed_out(exc: BaseException) -> bool:
        return isinstance(exc, grpc.aio.AioRpcError) and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED


class Capped:
    """`DataPlane.holding` with a concurrency cap: a slot first (waiting at most --queue-timeout, then 429),
    then the lease. A class, not a generator: it is on the hot path, and a free slot is taken without
    starting a timeout."""

    __slots__ = ("dp", "key", "wait_s", "lease")

    def __init__(self, dp: DataPlane, key: str | ModelKey, wait_s: float | None) -> None:
        self.dp, self.key, self.wait_s = dp, key, wait_s
        self.lease: Lease | None = None

    async def __aenter__(self) -> ModelRecord:
        dp = self.dp
        slots = dp._slots
        assert slots is not None
        if not slots.locked():
            await slots.acquire()  # free: returns at once
        else:
            try:
                await asyncio.wait_for(slots.acquire(), timeout=dp.queue_timeout_s)
            except asyncio.TimeoutError:
                raise Throttled(
                    f"all {dp.max_concurrency} invocation slots stayed busy for {dp.queue_timeout_s:.0f}s "
                    f"(model {str(self.key)!r}); retry with backoff") from None
        try:
            self.lease = dp.manager.lease(self.key, self.wait_s)
            return await self.lease.__aenter__()
        except BaseException:
            slots.release()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            assert self.lease is not None
            await self.lease.__aexit__(*exc_info)
        finally:
            assert self.dp._slots is not None
            self.dp._slots.release()


@dataclass(frozen=True)
class IndexRow:
    key: str
    state: str  # Triton's words: READY, LOADING, UNLOADING, UNAVAILABLE
    reason: str


class DataPlane:
    """What every edge calls; built once by the composition root and handed to each edge."""

    def __init__(self, manager: ModelManager, http: TritonHttp, grpc_client: TritonGrpc, metrics: Metrics,
                 max_concurrency: int | None, queue_timeout_s: float, max_request_bytes: int,
                 infer_timeout_s: float) -> None:
        self.manager = manager
        self.infer_timeout_s = infer_timeout_s
        self.max_request_bytes = max_request_bytes
        self.http = http
        self.grpc = grpc_client
        self.metrics = metrics
        self.max_concurrency = max_concurrency
        self.queue_timeout_s = queue_timeout_s
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self.checks = RequestChecker(max_request_bytes)
        self._metadata: OrderedDict[tuple[str, str | None], dict[str, Any]] = OrderedDict()

    @property
    def wait_timeout_s(self) -> float:
        return self.manager.config.wait_timeout_s

    # -- holding a model for a request ----------------------------------------------------------------------

    def holding(self, key: str | ModelKey, wait_s: float | None = None) -> AbstractAsyncContextManager[ModelRecord]:
        """A concurrency slot (the profile's vCPUs: wait, then 429) and a lease on the ready model; without a
        cap, the lease alone (no extra layer on the hot path)."""
        if self._slots is None:
            return self.manager.lease(key, wait_s)
        return Capped(self, key, wait_s)

    @contextlib.asynccontextmanager
    async def serving(self, key: str | ModelKey, protocol: str,
                      wait_s: float | None = None) -> AsyncIterator[tuple[ModelRecord, Outcome]]:
        """`holding`, and the request counted under `protocol` (see `Outcome`)."""
        with Outcome(self.metrics, protocol) as outcome:
            async with self.holding(key, wait_s) as rec:
                yield rec, outcome

    # -- inference --------------------------------------------------------------------------------------------

    async def forward_infer(self, rec: ModelRecord, key: str, body: Body, headers: Mapping[str, str],
                            version: str | None = None) -> Forwarded:
        """POST a KServe v2 HTTP infer body for a held model; the answer names `key`, errors included."""
        path = model_path(rec.name, version, "/infer")
        with Watch(self.manager, rec, key, self.infer_timeout_s):
            answer = await self.http.request("POST", path, body, headers)
        if answer.status >= 400:
            if _UNKNOWN_MODEL in answer.body and version is None:
                self._lost(rec, key)
            if _STUB_DIED.search(answer.body):
                self.manager.heal(rec, "stub_died")
        return restore_model_name(answer, rec.name, key)

    def _lost(self, rec: ModelRecord, key: str) -> None:
        """Triton answered "unknown model" for a model the gateway holds loaded (Triton restarted, or its
        state changed behind the gateway): reload it on the next request, and say "retry" now, never 404."""
        self.manager.lost([rec])
        raise ModelNotReady(f"model {key!r} is being loaded again (Triton lost it); retry shortly")

    async def infer(self, key: str, body: Body, headers: Mapping[str, str], protocol: str,
                    version: str | None = None) -> Forwarded:
        """KServe v2 HTTP inference: the body reaches Triton as sent (inflated if it was compressed).
        `serving` without its generator layer: this is nearly every request."""
        with Outcome(self.metrics, protocol) as outcome:
            body, headers = await self.checks.http(key, body, headers)  # before any model is loaded for it
            if version is not None:
                model_path("", version)  # refused before a model is loaded for it
            async with self.holding(key) as rec:
                answer = await self.forward_infer(rec, key, body, headers, version)
                outcome.status = answer.status
                return answer

    async def infer_grpc(self, raw: bytes, protocol: str, timeout_s: float, wait_s: float | None = None) -> bytes:
        """KServe v2 gRPC inference on a serialized ModelInferRequest: scanned for the checks and the
        TargetModel, never parsed whole; only `model_name` is rewritten each way (`gateway.grpc_wire`), so
        tensors pass as bytes, which the gateway copies once each way (the join that writes the new name)."""
        with Outcome(self.metrics, protocol) as outcome:  # `serving` without its generator layer, as in `infer`
            request = await self.checks.grpc(raw)
            key = request.model_name
            async with self.holding(key, wait_s) as rec:
                try:
                    with Watch(self.manager, rec, key, timeout_s, ours=timeout_s >= self.infer_timeout_s):
                        answer = await self.grpc.infer(renamed(raw, request, rec.name), timeout_s)
                except grpc.aio.AioRpcError as exc:
                    if _UNKNOWN_MODEL.decode() in (exc.details() or "") and not request.model_version:
                        self._lost(rec, key)
                    outcome.status = http_status(exc.code())
                    raise upstream_error(exc, {rec.name: key}) from None
            outcome.status = 200
        return rename(answer, key)[1]

    async def metadata_json(self, rec: ModelRecord) -> dict[str, Any] | Forwarded:
        """A held model's KServe metadata (inputs, outputs), cached per artifact version; Triton's error
        answer (renamed) when it has none."""
        cache_key = (rec.name, rec.etag)
        cached = self._metadata.get(cache_key)
        if cached is not None:
            self._metadata.move_to_end(cache_key)
            return cached
        answer = await self.http.request("GET", f"/v2/models/{rec.name}")
        if answer.status != 200:
            return restore_model_name(answer, rec.name, rec.model.key)
        metadata = json.loads(answer.body)
        self._metadata[cache_key] = metadata
        while len(self._metadata) > _METADATA_CACHE_SIZE:
            self._metadata.popitem(last=False)
        return metadata

    # -- model resources -----------------------------------------------------------------------------------

    async def on_ready(self, key: str, fetch: Callable[[ModelRecord], Awaitable[T]], gone: Callable[[T], bool],
                       wait_s: float | None = None) -> T:
        """Make `key` ready, then `fetch` from Triton; once more if the model was evicted in between (these
        calls hold no lease, like a metadata call on Triton itself)."""
        for attempt in (1, 2):
            rec = await self.manager.ensure_ready(key, wait_s)
            result = await fetch(rec)
            if attempt == 1 and gone(result) and rec.state is not State.READY:
                continue
            return result
        raise AssertionError("unreachable")

    async def resource_json(self, key: str, suffix: str, version: str | None = None) -> Forwarded:
        """Metadata (`suffix` ""), `/config` or `/stats` of `key` over HTTP, every internal name renamed."""
        model_path("", version)  # a bad version is refused before the model is loaded for it

        async def fetch(rec: ModelRecord) -> Forwarded:
            path = model_path(rec.name, version, suffix)
            answer = await self.http.request("GET", path)
            if answer.status != 200:
                return restore_model_name(answer, rec.name, key)
            body = json.dumps(rename_json(json.loads(answer.body), rec.name, key)).encode()
            return Forwarded(200, {"content-type": "application/json"}, body)
        return await self.on_ready(key, fetch, lambda answer: answer.status != 200)

    async def resource_grpc(self, key: str, call: Callable[[str], Awaitable[M]], wait_s: float | None = None) -> M:
        """A typed gRPC call on `key`'s Triton name after making it ready; the answer and Triton's errors
        renamed."""
        async def fetch(rec: ModelRecord) -> M | TritonRpcError:
            try:
                answer = await call(rec.name)
            except grpc.aio.AioRpcError as exc:
                return upstream_error(exc, {rec.name: key})
            rename_message(answer, rec.name, key)
            return answer
        result = await self.on_ready(key, fetch, lambda r: isinstance(r, TritonRpcError), wait_s)
        if isinstance(result, TritonRpcError):
            raise result
        return result

    def names(self) -> dict[str, str]:
        """Triton name -> TargetModel for every model the gateway knows."""
        return {rec.name: rec.model.key for rec in self.manager.records()}

    def model_ready(self, key: str) -> bool:
        """Loaded now: a call would not wait for a load (asking does not load)."""
        rec = self.manager.record(key)
        return rec is not None and rec.state is State.READY

    # -- the repository, mapped to the gateway's lifecycle -----------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexRow]:
        """The models the gateway knows (not the whole store: it may hold thousands), sorted, in Triton's
        states, with the reason a model is not served when there is one."""
        rows = []
        for rec in sorted(self.manager.records(), key=lambda r: r.model.key):
            if rec.source is not None:
                continue  # registered through the container API: its own namespace, not a store key
            state = TRITON_STATES.get(rec.state, "UNAVAILABLE")
            if ready_only and state != "READY":
                continue
            reason = public(rec.error.message) if rec.error is not None and state == "UNAVAILABLE" else ""
            rows.append(IndexRow(rec.model.key, state, reason))
        return rows

    async def load(self, key: str, wait_s: float | None = None) -> ModelRecord:
        rec = await self.manager.ensure_ready(key, wait_s)
        log.info("repository.load", extra={"model": rec.model.key})
        return rec

    async def unload(self, key: str, wait_s: float = UNLOAD_WAIT_S) -> None:
        """Unload once the model's requests and any load in progress are done, waiting at most `wait_s`
        (409 after); a model that is not loaded is already unloaded, as Triton answers; one the gateway
        does not know is a 404."""
        rec = self.manager.record(key)
        if rec is None:
            raise ModelNotFound(f"model {key!r} is not known to the gateway")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not await self.manager.unload(rec, reason="api"):
            busy = rec.state in TRITON_STATES or (rec.pipeline is not None and not rec.pipeline.done())
            if not busy:
                break
            if loop.time() > deadline:
                raise ModelBusy(f"model {rec.model.key!r} is still serving {rec.leases} request(s) or loading "
                                f"(state {rec.state.value}) after {wait_s:.0f}s; retry the unload")
            await asyncio.sleep(_POLL_S)
        log.info("repository.unload", extra={"model": rec.model.key, "state": rec.state.value})
