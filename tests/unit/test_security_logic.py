"""Pure logic of the gateway's door: key lines and hashing, SigV4 checking, route scopes, request limits,
what error text a client may see, and which container-API urls lie under the root."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import zlib
from pathlib import Path

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from tritonclient.grpc import service_pb2 as pb

from gateway import redact
from gateway.api.grpc_auth import OPEN as GRPC_OPEN
from gateway.api.grpc_auth import method_scope
from gateway.api.guard import ANY_KEY, OPEN, is_sagemaker_runtime, read_head, required_scope
from gateway.errors import InvalidModelKey, InvalidRequest, ModelNotFound, RequestTooLarge, UnsupportedEncoding
from gateway.grpc_wire import scan_request
from gateway.infer_limits import check_grpc_request, check_http_request, inflate
from gateway.keys import KeyRing, digest, key_line, new_key, parse_keys
from gateway.naming import triton_name_for, validate_key
from gateway.sigv4 import SigV4Failure, check_head, verify
from gateway.store.path import resolve_under

# -- keys -------------------------------------------------------------------------------------------------


def test_a_key_line_holds_the_hash_and_never_the_key() -> None:
    key = new_key()
    line = key_line("app", ("invoke", "manage"), key)
    assert key not in line and line.endswith(digest(key))
    (parsed,) = parse_keys(line, "test")
    assert parsed.name == "app" and parsed.scopes == {"invoke", "manage"}


@pytest.mark.parametrize("text, why", [
    ("app invoke mme_plainsecret", "never in clear"), ("app admin sha256:" + "0" * 64, "scopes"),
    ("app invoke", "got 2 fields"), ("app invoke sha256:abc", "64 hex"),
])
def test_bad_key_lines_are_refused_naming_the_line(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        parse_keys("# comment\n\n" + text, "keys.txt")
    assert "keys.txt line 3" in str(refused.value)


def test_a_key_ring_checks_keys_and_reads_its_file_again_when_it_changes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = new_key(), new_key()
    file = tmp_path / "keys"
    file.write_text(key_line("a", ("invoke",), first) + "\n")
    ring = KeyRing(file, key_line("env", ("manage",), second))
    assert ring.enabled and ring.check(first).name == "a" and ring.check(second).name == "env"
    assert ring.check("mme_unknown") is None and ring.check("") is None
    third = new_key()
    file.write_text(key_line("c", ("invoke",), third) + "\n" + "a line that is not a key\n")
    monkeypatch.setattr("gateway.keys._RECHECK_S", 0.0)
    assert ring.check(first).name == "a"  # a broken file keeps the keys that were in force
    file.write_text(key_line("c", ("invoke",), third) + "\n")
    assert ring.check(third).name == "c" and ring.check(first) is None and ring.check(second).name == "env"


def test_no_key_source_means_authentication_off_and_an_empty_one_refuses_everyone(tmp_path: Path) -> None:
    assert not KeyRing(None, None).enabled
    empty = tmp_path / "none"
    empty.write_text("# nobody yet\n")
    ring = KeyRing(empty, None)
    assert ring.enabled and ring.check(new_key()) is None
    with pytest.raises(ValueError, match="does not exist"):
        KeyRing(tmp_path / "missing", None)


# -- scopes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, scope", [
    ("GET", "/v2/health/ready", OPEN), ("GET", "/ping", OPEN), ("GET", "/metrics", OPEN),
    ("POST", "/v2/models/a/b.tar.gz/infer", "invoke"), ("GET", "/v2/models/x", "invoke"),
    ("POST", "/invocations", "invoke"), ("POST", "/v2/repository/index", "manage"),
    ("POST", "/v2/repository/models/x/unload", "manage"), ("GET", "/models", "manage"),
    ("DELETE", "/models/x", "manage"), ("POST", "/models/x/invoke", "manage"), ("GET", "/modelsx", "invoke"),
])
def test_each_route_needs_its_scope(method: str, path: str, scope: str) -> None:
    assert required_scope(method, path, metrics_auth=False) == scope


def test_metrics_need_any_key_when_asked_and_the_runtime_routes_are_recognised() -> None:
    assert required_scope("GET", "/metrics", metrics_auth=True) == ANY_KEY
    assert is_sagemaker_runtime("/invocations") and is_sagemaker_runtime("/endpoints/my-ep/invocations")
    assert not is_sagemaker_runtime("/models/x/invoke")


def test_grpc_methods_need_the_same_scopes() -> None:
    service = "/inference.GRPCInferenceService/"
    assert method_scope(service + "ServerLive") == GRPC_OPEN == method_scope(service + "ServerReady")
    assert method_scope(service + "ModelInfer") == "invoke" == method_scope(service + "ModelStreamInfer")
    assert method_scope(service + "RepositoryModelUnload") == "manage" == method_scope(service + "RepositoryIndex")


# -- SigV4 ------------------------------------------------------------------------------------------------


def _signed(body: bytes, secret: str = "secret", path: str = "/endpoints/my%20ep/invocations") -> dict[str, str]:
    request = AWSRequest(method="POST", url=f"http://127.0.0.1:8080{path}", data=body,
                         headers={"Content-Type": "text/csv", "X-Amzn-SageMaker-Target-Model": "a/b.tar.gz"})
    SigV4Auth(Credentials("AKID", secret), "sagemaker", "us-east-1").add_auth(request)
    return {"host": "127.0.0.1:8080", **{k.lower(): v for k, v in request.headers.items()}}


def test_sigv4_accepts_the_signer_s_own_request_and_refuses_any_change() -> None:
    path = "/endpoints/my%20ep/invocations"
    headers = _signed(b"1,2,3")
    verify("POST", path, "", headers, b"1,2,3", "AKID", "secret")
    cases = [
        (dict(headers), b"1,2,4", "AKID", "secret", "InvalidSignatureException"),  # body changed
        (dict(headers), b"1,2,3", "AKID", "other", "InvalidSignatureException"),  # another secret
        (dict(headers), b"1,2,3", "AKID2", "secret", "UnrecognizedClientException"),  # another access key
        ({**headers, "x-amzn-sagemaker-target-model": "c/d.tar.gz"}, b"1,2,3", "AKID", "secret",
         "InvalidSignatureException"),  # a signed header changed
        ({k: v for k, v in headers.items() if k != "authorization"}, b"1,2,3", "AKID", "secret",
         "IncompleteSignatureException"),
    ]
    for hdrs, body, key_id, secret, code in cases:
        with pytest.raises(SigV4Failure) as refused:
            verify("POST", path, "", hdrs, body, key_id, secret)
        assert refused.value.code == code


def test_sigv4_refuses_a_signature_outside_the_15_minute_window() -> None:
    headers = _signed(b"x")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=16)
    with pytest.raises(SigV4Failure, match="expired"):
        verify("POST", "/endpoints/my%20ep/invocations", "", headers, b"x", "AKID", "secret", now=later)


def _signed_with(headers: dict[str, str], body: bytes = b"1,2,3", service: str = "sagemaker",
                 secret: str = "secret") -> dict[str, str]:
    request = AWSRequest(method="POST", url="http://127.0.0.1:8080/invocations", data=body, headers=headers)
    SigV4Auth(Credentials("AKID", secret), service, "us-east-1").add_auth(request)
    return {"host": "127.0.0.1:8080", **{k.lower(): v for k, v in request.headers.items()}}


def test_sigv4_headers_that_change_what_a_request_does_must_be_signed_and_scoped_to_sagemaker() -> None:
    base = {"Content-Type": "text/csv"}
    cases = [  # (headers as they arrive, the code): each refused by check_head, before any body is read
        ({**_signed_with(base), "x-amzn-sagemaker-target-model": "a/b.tar.gz"}, "IncompleteSignatureException"),
        ({**_signed_with({}), "content-type": "text/csv"}, "IncompleteSignatureException"),
        ({**_signed_with(base), "x-amz-content-sha256": "0" * 64}, "IncompleteSignatureException"),
        (_signed_with({**base, "X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"}), "InvalidSignatureException"),
        (_signed_with(base, service="s3"), "InvalidSignatureException"),
    ]
    for headers, code in cases:
        with pytest.raises(SigV4Failure) as refused:
            check_head("POST", "/invocations", "", headers, "AKID", "secret")
        assert refused.value.code == code, headers
    unsigned_date = _signed_with(base)
    unsigned_date["authorization"] = unsigned_date["authorization"].replace(";x-amz-date,", ",")
    with pytest.raises(SigV4Failure, match="x-amz-date"):
        check_head("POST", "/invocations", "", unsigned_date, "AKID", "secret")
    checked = check_head("POST", "/invocations", "", _signed_with(base), "AKID", "secret")
    assert not checked.verified  # boto3's form: the signature covers a hash only the body gives
    checked.check_body(hashlib.sha256(b"1,2,3").hexdigest())
    with pytest.raises(SigV4Failure):
        checked.check_body(hashlib.sha256(b"1,2,4").hexdigest())


def test_a_signed_content_hash_decides_the_signature_before_the_body_and_the_body_must_match_it() -> None:
    declared = {"Content-Type": "text/csv", "X-Amz-Content-SHA256": hashlib.sha256(b"1,2,3").hexdigest()}
    checked = check_head("POST", "/invocations", "", _signed_with(declared), "AKID", "secret")
    assert checked.verified
    checked.check_body(hashlib.sha256(b"1,2,3").hexdigest())
    with pytest.raises(SigV4Failure, match="X-Amz-Content-SHA256"):
        checked.check_body(hashlib.sha256(b"1,2,4").hexdigest())
    with pytest.raises(SigV4Failure) as refused:  # a wrong secret is found from the headers alone
        check_head("POST", "/invocations", "", _signed_with(declared, secret="other"), "AKID", "secret")
    assert refused.value.code == "InvalidSignatureException"


def test_the_guard_reads_repeats_and_body_framing_from_the_headers() -> None:
    head = read_head([(b"host", b"x"), (b"authorization", b"Bearer a"), (b"content-length", b"0"),
                      (b"x-amzn-sagemaker-target-model", b"a"), (b"accept", b"*/*"), (b"accept", b"*/*")])
    assert head.repeated is None and head.authorization == "Bearer a" and not head.has_body
    head = read_head([(b"authorization", b"Bearer a"), (b"transfer-encoding", b"chunked"),
                      (b"authorization", b"Bearer b"), (b"x-amzn-sagemaker-target-model", b"a"),
                      (b"x-amzn-sagemaker-target-model", b"b")])
    assert head.repeated == "authorization" and head.authorization == "Bearer a" and head.has_body
    assert read_head([(b"content-length", b"12")]).has_body
    for name in (b"host", b"content-type", b"x-amz-date", b"x-amz-content-sha256", b"x-amzn-sagemaker-target-model"):
        assert read_head([(name, b"1"), (name, b"1")]).repeated == name.decode()


# -- request limits ---------------------------------------------------------------------------------------


def _json(inputs: list[dict]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def test_consistent_requests_pass_with_their_headers_trimmed() -> None:
    body = _json([{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [[1, 2, 3], [4, 5, 6]]}])
    out, headers = check_http_request("m", body, {"Content-Type": "application/json", "Cookie": "c"}, 1 << 20)
    assert out == body and headers == {"content-type": "application/json"}
    header = _json([{"name": "x", "shape": [2], "datatype": "INT64", "parameters": {"binary_data_size": 16}},
                    {"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}])
    check_http_request("m", header + bytes(25), {"inference-header-content-length": str(len(header))}, 1 << 20)


@pytest.mark.parametrize("body, error", [
    (_json([{"name": "x", "shape": [300_000_000, 6], "datatype": "FP32", "data": [1] * 6}]), RequestTooLarge),
    (_json([{"name": "x", "shape": [2, 6], "datatype": "FP32", "data": [1] * 6}]), InvalidRequest),
    (_json([{"name": "x", "shape": [-1, 6], "datatype": "FP32", "data": [1] * 6}]), InvalidRequest),
    (_json([{"name": "x", "shape": [1, True], "datatype": "FP32", "data": [1]}]), InvalidRequest),
    (_json([{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]), InvalidRequest),
    (_json([{"name": "x", "shape": [1], "datatype": "FP32"}]), InvalidRequest),
    (_json([{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]),
     InvalidRequest),
    (_json([{"shape": [1], "datatype": "FP32", "data": [1]}]), InvalidRequest),
    (b'{"inputs": [', InvalidRequest), (b"[1,2,3]", InvalidRequest), (b'{"inputs": []}', InvalidRequest),
])
def test_inconsistent_or_oversized_requests_are_refused(body: bytes, error: type) -> None:
    with pytest.raises(error, match="'m'"):
        check_http_request("m", body, {}, 1 << 20)


def test_binary_sizes_must_match_the_shapes_and_the_bytes_that_follow() -> None:
    header = _json([{"name": "x", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 24}}])
    for tail, length in ((bytes(12), str(len(header))), (bytes(24), "abc"), (bytes(24), str(len(header) + 99))):
        with pytest.raises(InvalidRequest):
            check_http_request("m", header + tail, {"inference-header-content-length": length}, 1 << 20)
    wrong = _json([{"name": "x", "shape": [1, 6], "datatype": "FP32", "parameters": {"binary_data_size": 20}}])
    with pytest.raises(InvalidRequest, match="binary_data_size"):
        check_http_request("m", wrong + bytes(20), {"inference-header-content-length": str(len(wrong))}, 1 << 20)


def test_compressed_bodies_inflate_under_the_cap_only() -> None:
    body = _json([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}])
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        out, headers = check_http_request("m", packed, {"content-encoding": encoding}, 1 << 20)
        assert out == body and "content-encoding" not in headers
    with pytest.raises(RequestTooLarge):
        inflate("m", gzip.compress(bytes(10 << 20)), "gzip", 1 << 20)
    with pytest.raises(UnsupportedEncoding):
        inflate("m", body, "br", 1 << 20)
    with pytest.raises(InvalidRequest, match="truncated"):
        inflate("m", gzip.compress(body)[:-12], "gzip", 1 << 20)


def _checked(request: pb.ModelInferRequest, cap: int = 1 << 20) -> None:
    """As the data plane does it: a scan of the serialized request, then the checks."""
    check_grpc_request(scan_request(request.SerializeToString()), cap)


def test_grpc_requests_are_checked_alike() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 6])
    request.raw_input_contents.append(bytes(24))
    _checked(request)
    request.inputs[0].shape[:] = [3_000_000, 6]
    with pytest.raises(RequestTooLarge):
        _checked(request)
    request.inputs[0].shape[:] = [2, 6]
    with pytest.raises(InvalidRequest, match="carries 24"):
        _checked(request)
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="INT32", shape=[3]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidRequest, match="hold 2"):
        _checked(typed)
    typed.inputs[0].contents.int_contents.append(3)
    _checked(typed)


def test_every_grpc_refusal_names_the_model_and_the_input() -> None:
    with pytest.raises(InvalidRequest, match="'m': the request has no inputs"):
        _checked(pb.ModelInferRequest(model_name="m"))
    two = pb.ModelInferRequest(model_name="m")
    two.inputs.add(name="a", datatype="FP32", shape=[1])
    two.inputs.add(name="b", datatype="FP32", shape=[1])
    two.raw_input_contents.append(bytes(4))
    with pytest.raises(InvalidRequest, match="1 raw_input_contents for 2 inputs"):
        _checked(two)
    negative = pb.ModelInferRequest(model_name="m")
    negative.inputs.add(name="x", datatype="FP32", shape=[-1, 6])
    with pytest.raises(InvalidRequest, match="'x' has shape \\[-1, 6\\]"):
        _checked(negative)
    odd = pb.ModelInferRequest(model_name="m")
    odd.inputs.add(name="x", datatype="FP8", shape=[1])
    with pytest.raises(InvalidRequest, match="datatype 'FP8'"):
        _checked(odd)
    shared = pb.ModelInferRequest(model_name="m")
    shared.inputs.add(name="x", datatype="FP32", shape=[1]).parameters["shared_memory_region"].string_param = "r"
    with pytest.raises(InvalidRequest, match="'x': shared memory is not available"):
        _checked(shared)
    strings = pb.ModelInferRequest(model_name="m")
    strings.inputs.add(name="s", datatype="BYTES", shape=[2])
    strings.raw_input_contents.append(b"\x01\x00\x00\x00a\x01\x00\x00\x00b")  # BYTES: at least 4 bytes a string
    _checked(strings)
    strings.raw_input_contents[0] = b"\x01\x00\x00"
    with pytest.raises(InvalidRequest, match="carries 3"):
        _checked(strings)
    with pytest.raises(RequestTooLarge, match="limit of 100 bytes"):
        _checked(_declaring([30, 1]), cap=100)


def _declaring(shape: list[int]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    return request


def test_a_key_segment_over_255_bytes_is_refused_and_messages_stay_short() -> None:
    validate_key("a/" + "b" * 255)
    with pytest.raises(InvalidModelKey, match="255 bytes") as refused:
        validate_key("a/" + "b" * 256)
    assert len(refused.value.message) < 200
    with pytest.raises(InvalidModelKey):
        validate_key("é" * 128)  # 256 bytes in UTF-8


# -- what a client may see ----------------------------------------------------------------------------------


def test_public_text_keeps_the_model_and_cause_and_drops_the_insides() -> None:
    internal = triton_name_for("cities/Houston_TX.tar.gz", "s3://b/p")
    redact.configure({"/srv/cache": "<cache>", "127.0.0.1:8001": "<triton>"},
                     lambda: {internal: "cities/Houston_TX.tar.gz"})
    try:
        text = (f"load failed for '{internal}': Traceback (most recent call last):\n"
                f'  File "/srv/cache/repo/{internal}/1/model.py", line 3, in initialize\n'
                "    raise RuntimeError('boom')\nRuntimeError: boom at /var/lib/x/y.bin via http://10.0.0.5:9000/b "
                "and 127.0.0.1:8001")
        shown = redact.public(text)
        assert "cities/Houston_TX.tar.gz" in shown and "RuntimeError: boom" in shown
        for hidden in (internal, "Traceback", "/srv/cache", "/var/lib", "10.0.0.5", "127.0.0.1"):
            assert hidden not in shown, hidden
        assert redact.public("TargetModel 'a/b/c.tar.gz' has shape [1, 6]") == "TargetModel 'a/b/c.tar.gz' has shape [1, 6]"
    finally:
        redact.configure({}, dict)


# -- the container API's root -------------------------------------------------------------------------------


def test_only_paths_under_the_root_resolve(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "out-link").symlink_to(outside)
    (root / "in-link").symlink_to(root / "model")
    assert resolve_under(root, "model", "n") == (root / "model").resolve()
    assert resolve_under(root, f"file://{root}/model", "n") == (root / "model").resolve()
    assert resolve_under(root, "in-link", "n") == (root / "model").resolve()
    for url in (str(outside), "../outside", "out-link", str(root), "/etc", "/"):
        with pytest.raises(InvalidRequest, match="container API root"):
            resolve_under(root, url, "n")
    with pytest.raises(ModelNotFound):
        resolve_under(root, "missing", "n")
