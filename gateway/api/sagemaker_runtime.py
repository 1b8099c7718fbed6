"""The SageMaker runtime API, as boto3's `sagemaker-runtime` client calls it, and its invocation path.

Runtime API (what boto3's `sagemaker-runtime` client calls): `POST /endpoints/{EndpointName}/invocations`,
and `POST /invocations`, with the TargetModel in `X-Amzn-SageMaker-Target-Model`. Errors come back in the
rest-json shape botocore parses into the service's named exceptions: the code in `X-Amzn-ErrorType` and in
the body's `__type`, the text in `Message` (the body also keeps the gateway's own `code` and `error`):

    gateway error                          SageMaker error              status  why
    InvalidModelKey, bad body/ContentType  ValidationError              400     the request is wrong
    ModelNotFound                          ValidationError              400     what SageMaker answers for a
                                                                                TargetModel with no object:
                                                                                "Failed to download model data"
    InvalidArtifact, ModelLoadFailed       ModelError (Original 422)    424     the model, not the request,
                                                                                is broken; not retried
    InsufficientMemory                     ModelError (Original 507)    424     the model does not fit even
                                                                                after eviction; retrying at
                                                                                once would not help, so no
                                                                                automatic SDK retry
    UpstreamTimeout                        ModelError (Original 504)    424     the model did not answer within
                                                                                --infer-timeout
    ModelUnhealthy, DiskFull, DiskFailed   ServiceUnavailable           503     its process hung or died and is
                                                                                being restarted, or the local
                                                                                disk is full: SDKs retry it
    MemoryBusy                             ServiceUnavailable           503     it fits, but the loaded models
                                                                                stayed busy: SDKs retry it
    Triton answered 4xx/5xx to the infer   ModelError (Original = it)   424     SageMaker's "received client/
                                                                                server error from model"
    ModelNotReady                          ModelNotReadyException       429     still loading: SDKs retry it
    Throttled                              ThrottlingException          400     AWS's throttling shape: SDKs
                                                                                retry it with backoff
    TritonUnavailable                      ServiceUnavailable           503     transient: SDKs retry it
    StoreUnavailable                       InternalDependencyException  530     the store failed, not the
                                                                                request or the model
    Unauthenticated, Forbidden             UnrecognizedClient..., ...  401/403 AWS's codes for the same cases
                                           AccessDeniedException
    RequestTooLarge, RequestTimeout,       ValidationError              413/408 the request is wrong; its own
    UnsupportedEncoding                                                 /415    status says how
    anything else                          InternalFailure              500

The answer carries `Content-Type`, `X-Amzn-Invoked-Production-Variant: AllTraffic` and the request's
`X-Amzn-SageMaker-Custom-Attributes` echoed (the gateway has no model code that could rewrite it).

Bodies (`ContentType`): `application/json` (or none) is KServe v2 JSON and passes through;
`application/vnd.sagemaker-triton.binary+json;json-header-size=N` (SageMaker's Triton binary form) and
`application/octet-stream` with `Inference-Header-Content-Length` pass through as binary tensors;
`text/csv` rows are converted for models with exactly one two-dimensional FP32 input (see csv_codec).
`Accept`: `text/csv` answers CSV, `application/json` the model's v2 answer; absent or `*/*`, the answer
takes the request's form (CSV in, CSV out).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.api.csv_codec import CSV_MEDIA_TYPE, CsvError, csv_answer, csv_input, encode_request, row_blocks, rows_of
from gateway.dataplane import DataPlane
from gateway.errors import (
    DiskFailed,
    DiskFull,
    GatewayError,
    InsufficientMemory,
    InvalidArtifact,
    InvalidModelKey,
    InvalidRequest,
    InvalidRequestBody,
    MemoryBusy,
    ModelAlreadyExists,
    ModelUnhealthy,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    StoreUnavailable,
    Throttled,
    TritonUnavailable,
    UpstreamTimeout,
)
from gateway.naming import ModelKey, validate_key
from gateway.redact import public
from gateway.triton.http import Forwarded

log = logging.getLogger(__name__)

TARGET_MODEL_HEADER = "x-amzn-sagemaker-target-model"
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"
VARIANT_HEADER = "X-Amzn-Invoked-Production-Variant"
VARIANT = "AllTraffic"
JSON_MEDIA_TYPE = "application/json"
TRITON_BINARY_MEDIA_TYPE = "application/vnd.sagemaker-triton.binary+json"
OCTET_MEDIA_TYPE = "application/octet-stream"


# -- the runtime error shape ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SageMakerError:
    """One SageMaker runtime error: botocore's code, the HTTP status, and the ModelError extras."""

    code: str
    status: int
    message: str
    gateway_code: str
    original_status: int | None = None
    original_message: str | None = None
    retry_after: bool = False


def runtime_error(exc: GatewayError, key: str | None = None) -> SageMakerError:
    """Map a gateway error to the SageMaker runtime error botocore raises for it (table in the module doc)."""
    if isinstance(exc, ModelNotFound):  # SageMaker's words for a TargetModel with no object behind it
        message = f"Failed to download model data for TargetModel {key!r}: {exc.message}" if key else exc.message
        return SageMakerError("ValidationError", 400, message, exc.code)
    if isinstance(exc, (InvalidModelKey, InvalidRequestBody, InvalidRequest, ModelAlreadyExists)):
        return SageMakerError("ValidationError", 400, exc.message, exc.code)
    if isinstance(exc, UpstreamTimeout):  # the model did not answer in time: SageMaker's ModelError
        return SageMakerError("ModelError", 424, exc.message, exc.code, exc.status, exc.message)
    if isinstance(exc, (MemoryBusy, ModelUnhealthy, DiskFull, DiskFailed)):  # transient: the SDK retries a 503
        return SageMakerError("ServiceUnavailable", 503, exc.message, exc.code, retry_after=True)
    if isinstance(exc, (InvalidArtifact, ModelLoadFailed, InsufficientMemory)):
        return SageMakerError("ModelError", 424, exc.message, exc.code, exc.status, exc.message)
    if isinstance(exc, ModelNotReady):
        return SageMakerError("ModelNotReadyException", 429, exc.message, exc.code, retry_after=True)
    if isinstance(exc, Throttled):
        return SageMakerError("ThrottlingException", 400, exc.message, exc.code)
    if isinstance(exc, TritonUnavailable):
        return SageMakerError("ServiceUnavailable", 503, exc.message, exc.code, retry_after=True)
    if isinstance(exc, StoreUnavailable):
        return SageMakerError("InternalDependencyException", 530, exc.message, exc.code)
    if exc.aws_code is not None:  # authentication and request bounds: their own status, AWS's code
        return SageMakerError(exc.aws_code, exc.status, exc.message, exc.code)
    return SageMakerError("InternalFailure", 500, exc.message, exc.code)


def model_error(key: str, status: int, body: bytes) -> SageMakerError:
    """Triton answered the inference with an error: SageMaker's ModelError with the original status."""
    original = _error_text(body)
    kind = "client" if status < 500 else "server"
    return SageMakerError("ModelError", 424, f'Received {kind} error ({status}) from model {key!r} with message '
                         f'"{original}"', "ModelError", status, original)


def error_body(err: SageMakerError) -> dict[str, Any]:
    message = public(err.message)
    body: dict[str, Any] = {"__type": err.code, "Message": message}
    if err.original_status is not None:
        body["OriginalStatusCode"] = err.original_status
        body["OriginalMessage"] = public(err.original_message or "")
    body.update({"code": err.gateway_code, "error": message})  # the gateway's own shape, for plain HTTP
    return body


def runtime_response(err: SageMakerError, request_id: str, custom_attributes: str | None) -> Response:
    headers = {"X-Amzn-ErrorType": err.code, "x-amzn-RequestId": request_id}
    if err.retry_after:
        headers["Retry-After"] = "5"
    if custom_attributes is not None:
        headers[CUSTOM_ATTRIBUTES_HEADER] = custom_attributes
    return JSONResponse(error_body(err), status_code=err.status, headers=headers)


def _error_text(body: bytes, limit: int = 2000) -> str:
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            return parsed["error"][:limit]
    except ValueError:
        pass
    return body.decode("utf-8", "replace")[:limit]


# -- content negotiation ------------------------------------------------------------------------------


def media_type(value: str | None) -> tuple[str, dict[str, str]]:
    """`text/csv; charset=utf-8` -> ("text/csv", {"charset": "utf-8"})."""
    if not value:
        return "", {}
    kind, *params = value.split(";")
    parsed = {}
    for param in params:
        name, _, val = param.partition("=")
        if name.strip():
            parsed[name.strip().lower()] = val.strip().strip('"')
    return kind.strip().lower(), parsed


def request_form(content_type: str | None) -> tuple[str, dict[str, str]]:
    """"csv", "json" or "binary", with the headers to forward to Triton for a pass-through body."""
    kind, params = media_type(content_type)
    if kind == CSV_MEDIA_TYPE:
        return "csv", {}
    if kind in ("", JSON_MEDIA_TYPE):
        return "json", {"Content-Type": JSON_MEDIA_TYPE}
    if kind == TRITON_BINARY_MEDIA_TYPE:
        size = params.get("json-header-size", "")
        if not size.isdigit():
            raise InvalidRequestBody(f"ContentType {content_type!r} lacks json-header-size=<bytes of the JSON header>")
        return "binary", {"Content-Type": OCTET_MEDIA_TYPE, "Inference-Header-Content-Length": size}
    if kind == OCTET_MEDIA_TYPE:
        return "binary", {"Content-Type": OCTET_MEDIA_TYPE}
    raise InvalidRequestBody(
        f"ContentType {content_type!r} is not supported: send application/json (a KServe v2 request), text/csv "
        f"(rows of numbers for a model with one two-dimensional FP32 input) or {TRITON_BINARY_MEDIA_TYPE};"
        "json-header-size=N"
    )


def answer_form(accept: str | None, request: str) -> str:
    """What to answer: "csv", or "asis" (Triton's own answer); the request's form when Accept allows any."""
    default = "csv" if request == "csv" else "asis"
    if not accept:
        return default
    ranked = []
    for pos, item in enumerate(accept.split(",")):
        kind, params = media_type(item)
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        if kind and q > 0:
            ranked.append((-q, pos, kind))
    for _, _, kind in sorted(ranked):
        if kind in ("*/*", "*"):
            return default
        if kind in (CSV_MEDIA_TYPE, "text/*"):
            return "csv"
        if kind in (JSON_MEDIA_TYPE, TRITON_BINARY_MEDIA_TYPE, OCTET_MEDIA_TYPE, "application/*"):
            return "asis"
    raise InvalidRequestBody(f"Accept {accept!r} names no type this gateway answers: text/csv or application/json")


# -- the shared invocation path ---------------------------------------------------------------------------


async def csv_blocks(key: str, body: bytes) -> list[np.ndarray]:
    """A CSV body's rows (`csv_codec.row_blocks`), letting the event loop run between blocks: a 64 MiB body
    takes about a second to parse, which must not stop health checks and every other request meanwhile."""
    blocks = []
    try:
        for block in row_blocks(body):
            blocks.append(block)
            await asyncio.sleep(0)
    except CsvError as exc:
        raise InvalidRequestBody(f"TargetModel {key!r}: {exc}") from None
    return blocks


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


class Invoker:
    """Negotiate the forms, convert a CSV body, forward through the data plane, convert the answer back.
    Shared by the runtime API and the container API's invoke."""

    def __init__(self, dp: DataPlane) -> None:
        self.dp = dp

    async def invoke(self, key: str, body: bytes, request_headers: Mapping[str, str], protocol: str,
                     registered: ModelKey | None = None) -> Answer:
        """Triton's answer for `key` (the store's, or the container API's `registered` model of that name); a
        status >= 400 is the model's own error (the caller shapes it)."""
        try:
            form, headers = request_form(request_headers.get("content-type"))
            wanted = answer_form(request_headers.get("accept"), form)
            encoding = request_headers.get("content-encoding")
            if form == "csv" and encoding and encoding.lower() != "identity":
                raise InvalidRequestBody(f"text/csv bodies must not be compressed (Content-Encoding {encoding!r})")
            blocks = await csv_blocks(key, body) if form == "csv" else []  # before a model is loaded for it
            if form != "csv":  # pass-through: what Triton needs to read the body as the client sent it
                for name in ("inference-header-content-length", "content-encoding"):
                    if name in request_headers and name not in {h.lower() for h in headers}:
                        headers[name] = request_headers[name]
                body, headers = await self.dp.checks.http(key, body, headers)
        except GatewayError as exc:
            self.dp.metrics.count_request(protocol, exc.status)
            raise
        async with self.dp.serving(registered or key, protocol) as (rec, outcome):
            if form == "csv":
                metadata = await self.dp.metadata_json(rec)
                if isinstance(metadata, Forwarded):
                    outcome.status = metadata.status
                    return Answer(metadata.status, metadata.body, metadata.headers.get("content-type", JSON_MEDIA_TYPE))
                try:
                    spec = csv_input(metadata)
                    rows = rows_of(blocks, spec.columns, spec.rows)
                except CsvError as exc:
                    raise InvalidRequestBody(f"TargetModel {key!r}: {exc}") from None
                body, headers = encode_request(spec, rows)
            forwarded = await self.dp.forward_infer(rec, key, body, headers)
            answer = await self._answer(key, forwarded.status, forwarded.body, forwarded.headers, wanted)
            outcome.status = forwarded.status
            return answer

    async def _answer(self, key: str, status: int, body: bytes, headers: dict[str, str], wanted: str) -> Answer:
        content_type = headers.get("content-type", JSON_MEDIA_TYPE)
        header_size = headers.get("inference-header-content-length")
        if status >= 400:
            return Answer(status, body, content_type)
        if wanted == "csv":
            if header_size is not None:
                raise InvalidRequestBody(
                    f"TargetModel {key!r} answered binary tensors, which cannot be written as CSV: ask for JSON "
                    "outputs or Accept application/json"
                )
            try:  # a big answer is written elsewhere: 150,000 rows held the loop for about 0.2 s
                return Answer(status, await self.dp.checks.offload(csv_answer, body), CSV_MEDIA_TYPE)
            except (ValueError, CsvError) as exc:
                raise InvalidRequestBody(f"TargetModel {key!r}: its answer cannot be written as CSV: {exc}") from None
        if header_size is not None:  # SageMaker passes no extra headers back: the size rides in the type
            content_type = f"{TRITON_BINARY_MEDIA_TYPE};json-header-size={header_size}"
        return Answer(status, body, content_type)


# -- routes ------------------------------------------------------------------------------------------------


def routes(invoker: Invoker) -> list[Route]:
    async def invocations(request: Request) -> Response:
        """The runtime API: every outcome in the shape botocore parses."""
        request_id = str(uuid.uuid4())
        custom = request.headers.get(CUSTOM_ATTRIBUTES_HEADER)
        key = request.headers.get(TARGET_MODEL_HEADER)
        try:
            try:
                if not key:
                    raise InvalidModelKey(
                        "this is a multi-model endpoint: name the model with TargetModel (the "
                        "X-Amzn-SageMaker-Target-Model header), a key relative to the store prefix"
                    )
                validate_key(key)  # before a byte of the body is read: a bad key costs nothing
            except GatewayError as exc:
                invoker.dp.metrics.count_request("sagemaker", exc.status)
                raise
            answer = await invoker.invoke(key, await request.body(), request.headers, "sagemaker")
        except GatewayError as exc:
            return runtime_response(runtime_error(exc, key), request_id, custom)
        except Exception as exc:  # never a bare 500 page: botocore would not know what it was
            log.exception("sagemaker.unhandled", extra={"model": key})
            message = f"internal gateway error ({type(exc).__name__}); the gateway's log has the details"
            err = SageMakerError("InternalFailure", 500, message, "InternalError")
            return runtime_response(err, request_id, custom)
        if answer.status >= 400:
            assert key is not None
            return runtime_response(model_error(key, answer.status, answer.body), request_id, custom)
        headers = {VARIANT_HEADER: VARIANT, "x-amzn-RequestId": request_id}
        if custom is not None:
            headers[CUSTOM_ATTRIBUTES_HEADER] = custom
        return Response(answer.body, status_code=200, headers=headers, media_type=answer.content_type)

    return [
        Route("/invocations", invocations, methods=["POST"]),
        Route("/endpoints/{endpoint}/invocations", invocations, methods=["POST"]),
    ]
