"""AWS Signature Version 4 checked on the SageMaker runtime routes, so boto3 clients authenticate as they do
against SageMaker itself: with an access key id and its secret.

The check is split in two so that no body is read for a request its headers already condemn. `check_head`
looks at everything the headers hold: the Authorization header's form, the access key id, the credential
scope (its date, and the `sagemaker` service), X-Amz-Date within 15 minutes of the gateway's clock, and which
headers were signed (`host` and `x-amz-date` always; `x-amzn-sagemaker-target-model`, `content-type` and
`x-amz-content-sha256` whenever the request carries them, so a captured request cannot be replayed against
another model or with its body read another way). When the client signed X-Amz-Content-SHA256, the whole
signature is checked there too, from the headers alone. `HeadChecked.check_body` then takes the body's
SHA-256: compared with the signed X-Amz-Content-SHA256, or else used to finish the signature.

The signature is recomputed with botocore's own signer over exactly the headers the client signed, the path
as it was sent and the body's hash, then compared in constant time. Failures carry the error codes AWS
answers with (botocore raises them as ClientError with that code): `MissingAuthenticationTokenException`,
`IncompleteSignatureException`, `UnrecognizedClientException` (unknown access key),
`InvalidSignatureException` (wrong secret, a request changed on the way, a body that is not the signed
hash, another service's scope) and a signature out of the 15-minute window.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = datetime.timedelta(minutes=15)  # AWS's own window
SERVICE = "sagemaker"  # what boto3's sagemaker-runtime client puts in the credential scope
CONTENT_SHA256 = "x-amz-content-sha256"
# Headers that must be signed whenever present: each changes what a request does (the model it reaches, how
# its body is parsed, which body is accepted), so an unsigned one could be swapped in a captured request.
MUST_SIGN_WHEN_PRESENT = ("x-amzn-sagemaker-target-model", "content-type", CONTENT_SHA256)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SigV4Failure(Exception):
    """Why a signed request was refused: AWS's error code and message (HTTP 403 on every protocol)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class _Signer(SigV4Auth):
    """botocore's signer, given the payload's SHA-256 instead of the payload: the body is hashed as it
    arrives (or its signed hash taken from the headers), never held twice to be hashed at the end."""

    def __init__(self, credentials: Credentials, service: str, region: str, payload_sha256: str) -> None:
        super().__init__(credentials, service, region)
        self._payload_sha256 = payload_sha256

    def payload(self, request: AWSRequest) -> str:
        return self._payload_sha256


def _fields(authorization: str) -> dict[str, str]:
    """`AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...` as a dict."""
    _, _, rest = authorization.partition(" ")
    fields = {}
    for part in rest.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields[name] = value
    return fields


def is_sigv4(authorization: str | None) -> bool:
    return bool(authorization) and authorization.startswith(ALGORITHM + " ")  # type: ignore[union-attr]


@dataclass(frozen=True)
class HeadChecked:
    """A request whose SigV4 headers passed `check_head`; `check_body` decides it once the body is hashed."""

    method: str
    url: str
    signed_headers: dict[str, str]
    stamp: str
    region: str
    signature: str
    access_key_id: str
    secret_access_key: str
    declared_sha256: str | None  # the signed X-Amz-Content-SHA256: the signature over it is already checked

    @property
    def verified(self) -> bool:
        """The signature is checked already: only the body's hash remains to be compared."""
        return self.declared_sha256 is not None

    def check_body(self, body_sha256: str) -> None:
        """Return if the body whose SHA-256 (hex) is `body_sha256` is the one signed; raise SigV4Failure if not."""
        if self.declared_sha256 is not None:
            if not hmac.compare_digest(body_sha256, self.declared_sha256):
                raise SigV4Failure("InvalidSignatureException",
                                   "The body's SHA-256 does not match the signed X-Amz-Content-SHA256 header.")
            return
        self._check_signature(body_sha256)

    def _check_signature(self, payload_sha256: str) -> None:
        request = AWSRequest(method=self.method, url=self.url, headers=self.signed_headers)
        request.context["timestamp"] = self.stamp
        signer = _Signer(Credentials(self.access_key_id, self.secret_access_key), SERVICE, self.region,
                         payload_sha256)
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        if not hmac.compare_digest(expected.encode(), self.signature.encode()):
            raise SigV4Failure("InvalidSignatureException",
                               "The request signature we calculated does not match the signature you provided. "
                               "Check your AWS Secret Access Key and signing method.")


def check_head(method: str, raw_path: str, query: str, headers: Mapping[str, str], access_key_id: str,
               secret_access_key: str, now: datetime.datetime | None = None) -> HeadChecked:
    """Everything about a signed request that its headers decide, before any of its body is read; raise
    SigV4Failure at the first fault.

    `headers` are the request's, lower-cased names, each present once (the guard refuses repeats of the ones
    that matter); `raw_path` the path exactly as it arrived (still percent-encoded), because that is what the
    client signed.
    """
    fields = _fields(headers.get("authorization", ""))
    credential, signed, signature = fields.get("Credential"), fields.get("SignedHeaders"), fields.get("Signature")
    if not (credential and signed and signature):
        raise SigV4Failure("IncompleteSignatureException",
                           "Authorization header requires Credential, SignedHeaders and Signature")
    scope = credential.split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise SigV4Failure("IncompleteSignatureException", "Credential must be KEY/DATE/REGION/SERVICE/aws4_request")
    key_id, date, region, service = scope[:4]
    if not hmac.compare_digest(key_id.encode(), access_key_id.encode()):
        raise SigV4Failure("UnrecognizedClientException", "The security token included in the request is invalid.")
    if service != SERVICE:
        raise SigV4Failure("InvalidSignatureException", f"Credential should be scoped to correct service: '{SERVICE}'.")
    stamp = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise SigV4Failure("IncompleteSignatureException", "X-Amz-Date is missing or not YYYYMMDDTHHMMSSZ") from None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if abs(now - signed_at) > MAX_SKEW or not stamp.startswith(date):
        raise SigV4Failure("InvalidSignatureException",
                           f"Signature expired or not yet valid: {stamp} is more than 15 minutes from the "
                           "gateway's clock")
    names = [name for name in signed.split(";") if name]
    for required in ("host", "x-amz-date"):
        if required not in names:
            raise SigV4Failure("IncompleteSignatureException", f"SignedHeaders must include {required}")
    unsigned = [name for name in MUST_SIGN_WHEN_PRESENT if name in headers and name not in names]
    if unsigned:
        raise SigV4Failure("IncompleteSignatureException",
                           f"SignedHeaders must include {', '.join(unsigned)} when the request carries it")
    missing = [name for name in names if name not in headers]
    if missing:
        raise SigV4Failure("IncompleteSignatureException", f"signed headers missing from the request: {missing}")
    declared = headers.get(CONTENT_SHA256)
    if declared is not None and not _SHA256_HEX.fullmatch(declared):
        raise SigV4Failure("InvalidSignatureException",
                           "X-Amz-Content-SHA256 must be the body's SHA-256 in lower-case hex (an unsigned "
                           "payload is not accepted)")
    url = f"http://{headers['host']}{raw_path}" + (f"?{query}" if query else "")
    checked = HeadChecked(method, url, {name: headers[name] for name in names}, stamp, region, signature,
                          access_key_id, secret_access_key, declared)
    if declared is not None:
        checked._check_signature(declared)
    return checked


def verify(method: str, raw_path: str, query: str, headers: Mapping[str, str], body: bytes,
           access_key_id: str, secret_access_key: str, now: datetime.datetime | None = None) -> None:
    """Return if the request with this whole `body` is signed by `access_key_id` with `secret_access_key`;
    raise SigV4Failure if not. (`check_head` then `check_body`, for a body already in hand.)"""
    check_head(method, raw_path, query, headers, access_key_id, secret_access_key, now).check_body(
        hashlib.sha256(body).hexdigest())
