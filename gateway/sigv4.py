"""AWS Signature Version 4 checked on the SageMaker runtime routes, so boto3 clients authenticate as they do
against SageMaker itself: with an access key id and its secret.

The signature is recomputed with botocore's own signer over exactly the headers the client signed, the path
as it was sent and the body, then compared in constant time. Failures carry the error codes AWS answers
with (botocore raises them as ClientError with that code): `MissingAuthenticationTokenException`,
`IncompleteSignatureException`, `UnrecognizedClientException` (unknown access key),
`InvalidSignatureException` (wrong secret, or a request changed on the way) and a signature out of the
15-minute window.
"""

from __future__ import annotations

import datetime
import hmac
from collections.abc import Mapping

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = datetime.timedelta(minutes=15)  # AWS's own window


class SigV4Failure(Exception):
    """Why a signed request was refused: AWS's error code and message (HTTP 403 on every protocol)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


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


def verify(method: str, raw_path: str, query: str, headers: Mapping[str, str], body: bytes,
           access_key_id: str, secret_access_key: str, now: datetime.datetime | None = None) -> None:
    """Return if the request is signed by `access_key_id` with `secret_access_key`; raise SigV4Failure if not.

    `headers` are the request's, lower-cased names; `raw_path` the path exactly as it arrived (still
    percent-encoded), because that is what the client signed.
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
    if "host" not in names:
        raise SigV4Failure("IncompleteSignatureException", "SignedHeaders must include host")
    missing = [name for name in names if name not in headers]
    if missing:
        raise SigV4Failure("IncompleteSignatureException", f"signed headers missing from the request: {missing}")
    url = f"http://{headers['host']}{raw_path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, headers={name: headers[name] for name in names}, data=body)
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(access_key_id, secret_access_key), service, region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise SigV4Failure("InvalidSignatureException",
                           "The request signature we calculated does not match the signature you provided. Check "
                           "your AWS Secret Access Key and signing method.")
