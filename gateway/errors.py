"""Errors the gateway raises, each with the HTTP status a client expects.

Adapters translate these into their protocol's shape; the status lives here so every protocol agrees on
what went wrong (404: no such model in the store, 422: the artifact is not a usable model, ...).
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class: `status` is the HTTP status, `code` a stable machine-readable reason."""

    status: int = 500
    code: str = "InternalError"
    aws_code: str | None = None  # the SageMaker runtime's error code where it has its own for this case

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidModelKey(GatewayError):
    """The TargetModel is not a safe relative key under the store prefix."""

    status = 400
    code = "InvalidModelKey"


class InvalidRequestBody(GatewayError):
    """The body, its ContentType or the Accept header cannot be served (SageMaker: ValidationError)."""

    status = 400
    code = "InvalidRequestBody"


class InvalidRequest(GatewayError):
    """A request that is malformed (bad JSON, missing field, bad page token)."""

    status = 400
    code = "InvalidRequest"


class Unauthenticated(GatewayError):
    """No credentials, or credentials the gateway does not know."""

    status = 401
    code = "Unauthenticated"
    aws_code = "UnrecognizedClientException"


class Forbidden(GatewayError):
    """Valid credentials without the scope the route needs (`manage` for the repository and container API)."""

    status = 403
    code = "Forbidden"
    aws_code = "AccessDeniedException"


class RequestTooLarge(GatewayError):
    """The body, or the tensors it declares, exceed --max-request-bytes (after decompression)."""

    status = 413
    code = "RequestTooLarge"
    aws_code = "ValidationError"


class RequestTimeout(GatewayError):
    """The client stopped sending its body for longer than --body-timeout."""

    status = 408
    code = "RequestTimeout"
    aws_code = "ValidationError"


class UnsupportedEncoding(GatewayError):
    """A Content-Encoding the gateway does not inflate (it inflates gzip and deflate under the size cap)."""

    status = 415
    code = "UnsupportedContentEncoding"
    aws_code = "ValidationError"


class ModelNotFound(GatewayError):
    """No artifact with that key exists in the store."""

    status = 404
    code = "ModelNotFound"


class InvalidArtifact(GatewayError):
    """The artifact exists but is not a safe, usable model (bad gzip, path escape, nothing to serve)."""

    status = 422
    code = "InvalidArtifact"


class ModelLoadFailed(GatewayError):
    """Triton refused to load the model (bad config, model code raised, ...)."""

    status = 422
    code = "ModelLoadFailed"


class ModelAlreadyExists(GatewayError):
    """A model registered under that name exists already (SageMaker container API: 409)."""

    status = 409
    code = "ModelAlreadyExists"


class ModelBusy(GatewayError):
    """The model is serving requests, so it cannot be unloaded now."""

    status = 409
    code = "ModelBusy"


class ModelNameCollision(GatewayError):
    """The model's Triton name is held by another model (a record or a staged directory made for another
    key): a gateway fault, refused rather than answering with the other model."""

    code = "ModelNameCollision"


class ModelNotReady(GatewayError):
    """The model is still being staged or loaded past the caller's wait bound; retrying later succeeds."""

    status = 503
    code = "ModelNotReady"


class InsufficientMemory(GatewayError):
    """The model cannot fit in the memory budget even after evicting idle models."""

    status = 507
    code = "InsufficientMemory"


class Throttled(GatewayError):
    """Every concurrent-invocation slot stayed busy for the queue timeout (SageMaker: ThrottlingException)."""

    status = 429
    code = "ThrottlingException"


class MemoryBusy(GatewayError):
    """The model would fit, but the models holding the memory kept serving requests (or loading) for the
    admission wait: a retry soon succeeds. 503 with Retry-After on every protocol, because clients retry a
    503 and do not retry a 507, which means only "this model can never fit"."""

    status = 503
    code = "MemoryBusy"


class LoadTimedOut(ModelLoadFailed):
    """Triton did not finish loading the model within --load-timeout (its initialize hangs)."""

    code = "LoadTimedOut"


class UpstreamTimeout(GatewayError):
    """Triton did not answer a request within --infer-timeout: the model is treated as hung and restarted."""

    status = 504
    code = "ModelTimeout"


class ModelUnhealthy(GatewayError):
    """The model's process hung or died while serving; it is being restarted, and a retry soon succeeds."""

    status = 503
    code = "ModelUnhealthy"


class DiskFull(GatewayError):
    """The local disk (NVMe tier) has no room for the model now: transient, never remembered as a bad artifact."""

    status = 507
    code = "InsufficientStorage"


class DiskFailed(GatewayError):
    """The local disk failed while staging (I/O error, read-only): transient, never remembered."""

    status = 503
    code = "LocalDiskError"


class StoreUnavailable(GatewayError):
    """The artifact store could not be reached or refused access."""

    status = 502
    code = "StoreUnavailable"


class TritonUnavailable(GatewayError):
    """Triton is not answering (starting, restarting or gone)."""

    status = 503
    code = "TritonUnavailable"


class RequestCheckFailed(GatewayError):
    """The process checking a large request stopped before answering (see `gateway.request_checks`)."""

    status = 503
    code = "RequestCheckFailed"
