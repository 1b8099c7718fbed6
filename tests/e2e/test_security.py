"""Who may call what: API keys with scopes on every HTTP route and gRPC call, SigV4 for boto3, key rotation,
headers and credentials checked before any body is read, read timeouts, and a gateway that will not listen
beyond loopback with nobody checked.

One gateway with keys (an `invoke` key, a `manage` key, a key file it re-reads) and SigV4 credentials, on a
local store of demo models and a container-API root; every call is a real client's.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPResponse
from pathlib import Path
from typing import Callable, Iterator

import boto3
import botocore.exceptions
import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.demo import onnx_model, predict
from gateway.keys import key_line, new_key
from tests.helpers import REPO_ROOT, GatewayProcess, city_artifact, http, v2_request

MODEL = "Houston_TX.tar.gz"
HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]
ACCESS_KEY, SECRET = "AKIDGATEWAYTEST", "gateway-test-secret"
INVOKE_KEY, MANAGE_KEY, ROTATED_KEY = new_key(), new_key(), new_key()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# clients\n{key_line('app', ('invoke',), INVOKE_KEY)}\n{key_line('ops', ('invoke', 'manage'), MANAGE_KEY)}\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models-root")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, keys_file: Path, root: Path) -> Iterator[GatewayProcess]:
    store = tmp_path_factory.mktemp("secure-store")
    for city in ("Houston_TX", "Boston_MA"):
        (store / f"{city}.tar.gz").write_bytes(city_artifact(city))
    gateway = GatewayProcess(
        ["--store", str(store), "--api-keys-file", str(keys_file), "--sigv4-access-key-id", ACCESS_KEY,
         "--container-api", "--container-api-root", str(root), "--header-timeout", "1", "--body-timeout", "1"],
        tmp_path_factory.mktemp("secure-gateway"), env={"MME_SIGV4_SECRET_ACCESS_KEY": SECRET})
    try:
        yield gateway.wait_ready()
    finally:
        gateway.stop()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def infer(gw: GatewayProcess, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{MODEL}/infer", v2_request([HOUSE]), headers)
    return status, body


def grpc_features() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("features", [1, 6], "FP32")
    tensor.set_data_from_numpy(np.array([HOUSE], dtype=np.float32))
    return [tensor]


def test_anonymous_and_wrong_keys_are_refused_on_every_http_route(gw: GatewayProcess) -> None:
    routes = [
        ("POST", f"/v2/models/{MODEL}/infer", v2_request([HOUSE])),
        ("GET", f"/v2/models/{MODEL}", None), ("GET", f"/v2/models/{MODEL}/config", None), ("GET", "/v2", None),
        ("POST", "/invocations", v2_request([HOUSE])), ("POST", "/endpoints/demo/invocations", v2_request([HOUSE])),
        ("POST", "/v2/repository/index", b"{}"), ("POST", f"/v2/repository/models/{MODEL}/load", None),
        ("POST", f"/v2/repository/models/{MODEL}/unload", None),
        ("GET", "/models", None), ("POST", "/models", b'{"model_name": "x", "url": "x"}'),
        ("DELETE", f"/models/{MODEL}", None), ("GET", "/nowhere", None),
    ]
    for method, path, body in routes:
        for headers in ({}, bearer("mme_not-a-key"), {"Authorization": "Basic dXNlcjpwYXNz"}):
            status, answer, got = http(method, gw.url + path, body, headers)
            assert status == 401, (method, path, headers, status, answer)
            if not path.endswith("invocations"):
                assert got.get("www-authenticate", got.get("WWW-Authenticate", "")).startswith("Bearer")
    for path in ("/v2/health/live", "/v2/health/ready", "/ping", "/metrics"):
        assert http("GET", gw.url + path)[0] == 200, path  # health stays open; metrics unless --metrics-auth


def test_an_anonymous_delete_cannot_unload_another_client_s_model(gw: GatewayProcess) -> None:
    assert infer(gw, bearer(INVOKE_KEY))[0] == 200
    assert http("DELETE", f"{gw.url}/models/{MODEL}")[0] == 401
    assert http("POST", f"{gw.url}/v2/repository/models/{MODEL}/unload")[0] == 401
    status, body, _ = http("POST", f"{gw.url}/v2/repository/index", b"{}", bearer(MANAGE_KEY))
    assert status == 200 and {"name": MODEL, "version": "1", "state": "READY", "reason": ""} in json.loads(body)


def test_the_invoke_scope_calls_models_and_only_manage_changes_what_is_loaded(gw: GatewayProcess) -> None:
    status, body = infer(gw, bearer(INVOKE_KEY))
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], predict("Houston_TX", np.array([HOUSE])).ravel(),
                               rtol=1e-4)
    for method, path in (("POST", f"/v2/repository/models/{MODEL}/unload"), ("POST", "/v2/repository/index"),
                         ("GET", "/models"), ("DELETE", f"/models/{MODEL}")):
        status, answer, _ = http(method, gw.url + path, b"{}" if method == "POST" else None, bearer(INVOKE_KEY))
        assert status == 403 and "'manage'" in json.loads(answer)["error"], (path, answer)
    assert http("POST", f"{gw.url}/v2/repository/models/{MODEL}/unload", None, bearer(MANAGE_KEY))[0] == 200
    status, body, _ = http("POST", f"{gw.url}/v2/repository/index", b"{}", bearer(MANAGE_KEY))
    assert next(row for row in json.loads(body) if row["name"] == MODEL)["state"] == "UNAVAILABLE"
    assert infer(gw, bearer(INVOKE_KEY))[0] == 200  # loads again for a caller allowed to invoke


def test_grpc_needs_a_key_in_metadata_and_manage_for_the_repository(gw: GatewayProcess) -> None:
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    try:
        assert client.is_server_live() and client.is_server_ready()  # health stays open
        for headers, code in (({}, "UNAUTHENTICATED"), ({"authorization": "Bearer mme_wrong"}, "UNAUTHENTICATED")):
            with pytest.raises(InferenceServerException) as refused:
                client.infer(MODEL, grpc_features(), headers=headers)
            assert code in str(refused.value.status())
        answer = client.infer(MODEL, grpc_features(), headers={"authorization": f"Bearer {INVOKE_KEY}"})
        np.testing.assert_allclose(answer.as_numpy("price").ravel(),
                                   predict("Houston_TX", np.array([HOUSE])).ravel(), rtol=1e-4)
        for call in (lambda h: client.get_model_repository_index(headers=h),
                     lambda h: client.unload_model(MODEL, headers=h), lambda h: client.load_model(MODEL, headers=h)):
            with pytest.raises(InferenceServerException) as refused:
                call({"authorization": f"Bearer {INVOKE_KEY}"})
            assert "PERMISSION_DENIED" in str(refused.value.status())
            with pytest.raises(InferenceServerException) as refused:
                call({})
            assert "UNAUTHENTICATED" in str(refused.value.status())
        index = client.get_model_repository_index(headers={"authorization": f"Bearer {MANAGE_KEY}"}, as_json=True)
        assert MODEL in {m["name"] for m in index["models"]}
    finally:
        client.close()


def test_statistics_of_every_model_at_once_need_manage_and_one_model_s_need_invoke(gw: GatewayProcess) -> None:
    assert infer(gw, bearer(INVOKE_KEY))[0] == 200
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:  # it listed every model to an invoke key
            stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=30,
                                 metadata=(("authorization", f"Bearer {INVOKE_KEY}"),))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and "manage" in refused.value.details()
        one = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL), timeout=30,
                                   metadata=(("authorization", f"Bearer {INVOKE_KEY}"),))
        assert [s.name for s in one.model_stats] == [MODEL]
        every = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=30,
                                     metadata=(("authorization", f"Bearer {MANAGE_KEY}"),))
        assert MODEL in {s.name for s in every.model_stats}


def test_grpc_streams_are_refused_without_a_key(gw: GatewayProcess) -> None:
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=MODEL)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ModelStreamInfer(iter([request]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_boto3_sigv4_with_the_right_secret_is_served_and_a_wrong_one_gets_botocore_s_error(gw: GatewayProcess) -> None:
    def runtime(access_key: str, secret: str):  # type: ignore[no-untyped-def]
        from botocore.config import Config

        return boto3.client("sagemaker-runtime", endpoint_url=gw.url, region_name="us-east-1",
                            aws_access_key_id=access_key, aws_secret_access_key=secret,
                            config=Config(retries={"max_attempts": 1}))

    answer = runtime(ACCESS_KEY, SECRET).invoke_endpoint(EndpointName="demo", TargetModel=MODEL,
                                                         ContentType="text/csv", Body="1994,3188,5,1.5,1.62,3")
    price = float(answer["Body"].read().decode().strip())
    assert price == pytest.approx(float(predict("Houston_TX", np.array([HOUSE])).ravel()[0]), rel=1e-4)
    for access_key, secret, code in ((ACCESS_KEY, "wrong-secret", "InvalidSignatureException"),
                                     ("AKIDSOMEONEELSE", SECRET, "UnrecognizedClientException")):
        with pytest.raises(botocore.exceptions.ClientError) as refused:
            runtime(access_key, secret).invoke_endpoint(EndpointName="demo", TargetModel=MODEL,
                                                        ContentType="text/csv", Body="1994,3188,5,1.5,1.62,3")
        error = refused.value.response
        assert error["Error"]["Code"] == code and error["ResponseMetadata"]["HTTPStatusCode"] == 403
    # a Bearer key works on the runtime routes too, for plain HTTP clients
    status, _, _ = http("POST", f"{gw.url}/invocations", b"1994,3188,5,1.5,1.62,3",
                        {"Content-Type": "text/csv", "X-Amzn-SageMaker-Target-Model": MODEL, **bearer(INVOKE_KEY)})
    assert status == 200


def test_keys_rotate_without_a_restart(gw: GatewayProcess, keys_file: Path) -> None:
    assert infer(gw, bearer(ROTATED_KEY))[0] == 401
    original = keys_file.read_text()
    keys_file.write_text(original + key_line("app-2", ("invoke",), ROTATED_KEY) + "\n")
    try:
        deadline = time.monotonic() + 10
        while infer(gw, bearer(ROTATED_KEY))[0] != 200:
            assert time.monotonic() < deadline, "the new key was not picked up"
            time.sleep(0.3)
        assert infer(gw, bearer(INVOKE_KEY))[0] == 200  # both valid while clients move over
        keys_file.write_text("\n".join(line for line in keys_file.read_text().splitlines()
                                       if not line.startswith("app ")) + "\n")
        deadline = time.monotonic() + 10
        while infer(gw, bearer(INVOKE_KEY))[0] != 401:
            assert time.monotonic() < deadline, "the removed key still works"
            time.sleep(0.3)
        assert infer(gw, bearer(ROTATED_KEY))[0] == 200
    finally:
        keys_file.write_text(original)
        time.sleep(1.5)  # the file is looked at once a second


def test_the_container_api_loads_only_from_under_its_root(gw: GatewayProcess, root: Path,
                                                          tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.py").write_text("import os\nos.system('touch %s')\n" % (tmp_path / "ran"))
    (outside / "config.pbtxt").write_text('backend: "python"\n')
    (root / "escape").symlink_to(outside)
    manage = {**bearer(MANAGE_KEY), "Content-Type": "application/json"}
    for url in (str(outside), f"file://{outside}", "/etc", "/", f"{root}/../{outside.name}", "escape",
                str(root / "escape"), str(root)):
        status, body, _ = http("POST", f"{gw.url}/models", json.dumps({"model_name": "evil", "url": url}).encode(),
                               manage)
        assert status in (400, 404), (url, status, body)
        error = json.loads(body)["error"]
        assert str(outside) not in error and str(root) not in error and "passwd" not in error
    assert not (tmp_path / "ran").exists()  # no code from outside the root ever ran
    inside = root / "Boston"
    inside.mkdir()
    (inside / "model.onnx").write_bytes(onnx_model("Boston_MA").SerializeToString())
    status, body, _ = http("POST", f"{gw.url}/models", json.dumps({"model_name": "boston", "url": "Boston"}).encode(),
                           manage)
    assert status == 200, body
    try:
        status, body, _ = http("POST", f"{gw.url}/models/boston/invoke", v2_request([HOUSE]), manage)
        assert status == 200, body
    finally:
        http("DELETE", f"{gw.url}/models/boston", None, manage)


def test_a_registered_name_never_changes_what_a_store_key_answers(gw: GatewayProcess, root: Path) -> None:
    boston = root / "boston-for-houston"
    boston.mkdir()
    (boston / "model.onnx").write_bytes(onnx_model("Boston_MA").SerializeToString())
    manage = {**bearer(MANAGE_KEY), "Content-Type": "application/json"}
    status, body, _ = http("POST", f"{gw.url}/models",
                           json.dumps({"model_name": MODEL, "url": "boston-for-houston"}).encode(), manage)
    assert status == 409 and "store" in json.loads(body)["error"]
    status, body, _ = http("POST", f"{gw.url}/models",
                           json.dumps({"model_name": "Denver_CO.tar.gz", "url": "boston-for-houston"}).encode(), manage)
    assert status == 200, body
    try:  # registered, its name is not a store key for KServe or the runtime API: those still mean the store
        status, body, _ = http("POST", f"{gw.url}/v2/models/Denver_CO.tar.gz/infer", v2_request([HOUSE]),
                               bearer(INVOKE_KEY))
        assert status == 404, body
        expected = predict("Houston_TX", np.array([HOUSE])).ravel()
        status, body = infer(gw, bearer(INVOKE_KEY))
        np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], expected, rtol=1e-4)
    finally:
        http("DELETE", f"{gw.url}/models/Denver_CO.tar.gz", None, manage)


def _slow_answer(gw: GatewayProcess, first: bytes) -> tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as conn:
        conn.sendall(first)
        started = time.monotonic()
        answer = conn.recv(4096)
        return time.monotonic() - started, answer


def test_slow_headers_and_a_stalled_body_are_cut_off(gw: GatewayProcess) -> None:
    waited, answer = _slow_answer(gw, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    assert answer.startswith(b"HTTP/1.1 408") and waited < 10
    waited, answer = _slow_answer(gw, b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n"
                                      b"Authorization: Bearer %s\r\n\r\n{\"inputs\"" % (MODEL.encode(), INVOKE_KEY.encode()))
    assert answer.startswith(b"HTTP/1.1 408") and waited < 10
    assert infer(gw, bearer(INVOKE_KEY))[0] == 200  # and everyone else is served


def test_headers_trickled_a_byte_at_a_time_are_cut_off_but_a_body_that_keeps_coming_is_served(
        gw: GatewayProcess) -> None:
    """The header bound counts from the request's first byte, however often bytes come; the body bound is
    between chunks, so a slow body that keeps moving (gaps under --body-timeout 1 s, 2.4 s in all) is read."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as conn:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                break
            conn.settimeout(0.25)
            try:
                answer += conn.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started < 5
    body = v2_request([HOUSE])
    step = -(-len(body) // 6)  # six pieces, 0.4 s apart
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as conn:
        conn.sendall(b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                     b"Authorization: Bearer %s\r\n\r\n" % (MODEL.encode(), len(body), INVOKE_KEY.encode()))
        for start in range(0, len(body), step):
            time.sleep(0.4)
            conn.sendall(body[start:start + step])
        answer = conn.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_no_keys_means_loopback_only_unless_told_insecure(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "gateway", "serve", "--store", str(tmp_path), "--cache-dir", str(tmp_path / "c"),
               "--host", "0.0.0.0", "--port", "0", "--grpc-port", "0"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "--insecure" in done.stderr and "--api-keys-file" in done.stderr
    bad = tmp_path / "keys.txt"
    bad.write_text(f"app invoke {INVOKE_KEY}\n")  # a key in clear is refused: files hold hashes only
    done = subprocess.run([*command[:-6], "--api-keys-file", str(bad)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "never in clear" in done.stderr and INVOKE_KEY not in done.stderr


def test_the_container_api_is_off_unless_asked_for(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / MODEL).write_bytes(city_artifact("Houston_TX"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(onnx_model("Boston_MA").SerializeToString())
    gateway = GatewayProcess(["--store", str(store)], tmp_path / "gw").wait_ready()
    try:
        status, body, _ = http("POST", f"{gateway.url}/models",
                               json.dumps({"model_name": "m", "url": str(model)}).encode())
        assert status == 404 and "--container-api" in json.loads(body)["error"]
        assert http("GET", f"{gateway.url}/models")[0] == 404
        assert http("POST", f"{gateway.url}/models/m/invoke", v2_request([HOUSE]))[0] == 404
        assert http("GET", f"{gateway.url}/ping")[0] == 200  # SageMaker's health check stays
        assert not gateway.events("sagemaker.model_registered")
    finally:
        gateway.stop()


# -- headers and credentials before any body (issue 19, items 4 and 11) ------------------------------------

BIG = 32 << 20  # a body this size is announced (or pushed) by the attacks below; the gateway must not read it


def _send_head(gw: GatewayProcess, method: str, path: str, headers: list[tuple[str, str]]) -> socket.socket:
    """A connection with the request line and `headers` (repeats kept, in order) sent, and nothing after them;
    every read on it waits at most 5 s, so an answer that needs the body shows up as a timeout."""
    conn = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    conn.sendall(head.encode("latin-1"))
    return conn


def _response(conn: socket.socket, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    """The answer on `conn`: status, headers (names lower-cased) and body."""
    answer = HTTPResponse(conn, method=method)
    answer.begin()
    return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()


def _closed(conn: socket.socket) -> bool:
    """The gateway has closed the connection (it reads no more of what the client would send)."""
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True


def _pushed_whole(gw: GatewayProcess, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                  chunked: bool) -> bool:
    """Send the head, then push all of `body` (chunked when asked): True if the gateway took every byte,
    False if it closed the connection first."""
    with _send_head(gw, method, path, headers) as conn:
        conn.settimeout(20)
        piece = 1 << 20
        try:
            for start in range(0, len(body), piece):
                part = body[start:start + piece]
                conn.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
            if chunked:
                conn.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True


def _peak_growth(pid: int, attack: Callable[[], None]) -> int:
    """How far the gateway's resident memory peaked above where it stood, while `attack` ran."""
    def field(name: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {name}")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    before = field("VmRSS")
    attack()
    return field("VmHWM") - before


def _at_once(count: int, one: Callable[[], bool]) -> list[bool]:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(), range(count)))


def _stamp(at: datetime.datetime | None = None) -> str:
    return (at or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def _signed(gw: GatewayProcess, path: str, body: bytes, headers: dict[str, str], secret: str = SECRET,
            service: str = "sagemaker") -> list[tuple[str, str]]:
    """`headers` plus Host, X-Amz-Date and Authorization, signed by botocore's own SigV4 signer over `body`
    (or over the X-Amz-Content-SHA256 in `headers`, when there is one: botocore signs that value instead)."""
    request = AWSRequest(method="POST", url=gw.url + path, data=body, headers=headers)
    SigV4Auth(Credentials(ACCESS_KEY, secret), service, "us-east-1").add_auth(request)
    return [("Host", f"127.0.0.1:{gw.port}"), *request.headers.items()]


def _forged(key_id: str = "AKIDFORGED", stamp: str | None = None) -> list[tuple[str, str]]:
    stamp = stamp or _stamp()
    return [("Host", "x"), ("X-Amz-Date", stamp), ("Authorization", (
        f"AWS4-HMAC-SHA256 Credential={key_id}/{stamp[:8]}/us-east-1/sagemaker/aws4_request, "
        f"SignedHeaders=host;x-amz-date, Signature={'0' * 64}"))]


def _runtime_head(extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [("Content-Type", "application/json"), ("X-Amzn-SageMaker-Target-Model", MODEL), *extra]


def test_a_forged_sigv4_post_is_refused_from_its_headers_without_reading_the_body(gw: GatewayProcess) -> None:
    body = v2_request([HOUSE])
    sha_of_other = hashlib.sha256(b"another body").hexdigest()
    old = _stamp(datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=20))
    refusals = [  # (headers, the code botocore would raise): each is decidable before a byte of body
        (_runtime_head(_forged()), "UnrecognizedClientException"),  # an access key id nobody issued
        (_runtime_head(_forged(ACCESS_KEY, old)), "InvalidSignatureException"),  # outside the 15 minutes
        (_signed(gw, "/invocations", body, {"Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": MODEL,
                                            "X-Amz-Content-SHA256": sha_of_other}, secret="wrong-secret"),
         "InvalidSignatureException"),  # a signed body hash: the whole signature is checked from the headers
        (_signed(gw, "/invocations", body, {"Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": MODEL},
                 service="s3"), "InvalidSignatureException"),  # scoped to another service
    ]
    for headers, code in refusals:
        with _send_head(gw, "POST", "/invocations", [*headers, ("Content-Length", str(BIG))]) as conn:
            status, got, answer = _response(conn)  # within the socket's 5 s, with no body sent
            assert status == 403 and got["x-amzn-errortype"] == code, (headers, status, answer)
            assert json.loads(answer)["__type"] == code
            assert _closed(conn)  # nothing more is read from a refused request
    # eight connections pushing their 32 MiB at once: each is cut off, and none of it sits in the gateway
    pushes: list[bool] = []
    grown = _peak_growth(gw.proc.pid, lambda: pushes.extend(_at_once(8, lambda: _pushed_whole(
        gw, "POST", "/invocations", _runtime_head([*_forged(), ("Content-Length", str(BIG))]), bytes(BIG), False))))
    assert not any(pushes), "the gateway read a forged request's whole body"
    assert grown < 8 << 20, f"the gateway grew {grown / 2**20:.0f} MiB"


def test_get_head_and_delete_bodies_are_refused_before_they_are_read(gw: GatewayProcess) -> None:
    routes = [("GET", "/invocations", _forged()),
              ("GET", f"/v2/models/{MODEL}", [("Host", "x"), *bearer(INVOKE_KEY).items()]),
              ("DELETE", f"/models/{MODEL}", [("Host", "x"), *bearer(MANAGE_KEY).items()]),
              ("HEAD", "/v2/health/live", [("Host", "x")]), ("GET", "/nowhere", [("Host", "x")])]
    for method, path, headers in routes:
        for framing in (("Transfer-Encoding", "chunked"), ("Content-Length", str(BIG))):
            with _send_head(gw, method, path, [*headers, framing]) as conn:
                if framing[0] == "Transfer-Encoding":
                    conn.sendall(b"10000\r\n" + bytes(1 << 16) + b"\r\n")  # one chunk, and never the last
                status, _, answer = _response(conn, method)
                assert status == 400, (method, path, framing, status, answer)
                if method != "HEAD":
                    assert method in json.loads(answer)["error"]
                assert _closed(conn)
    # chunked GETs pushing 32 MiB each, SigV4-looking and not: cut off, none of it held
    pushes: list[bool] = []
    grown = _peak_growth(gw.proc.pid, lambda: pushes.extend(_at_once(8, lambda: _pushed_whole(
        gw, "GET", "/invocations", [*_forged(), ("Transfer-Encoding", "chunked")], bytes(BIG), True))))
    assert not any(pushes), "the gateway read a GET's whole body"
    assert grown < 8 << 20, f"the gateway grew {grown / 2**20:.0f} MiB"
    assert http("GET", f"{gw.url}/v2/models/{MODEL}", None, bearer(INVOKE_KEY))[0] == 200  # no body: served


def test_repeated_routing_and_signing_headers_are_refused_naming_the_header(gw: GatewayProcess) -> None:
    body = v2_request([HOUSE])
    # signed for Boston (the last Target-Model header) while a first one names Houston: the two readers disagree
    signed = _signed(gw, "/invocations", body, {"Content-Type": "application/json",
                                                 "X-Amzn-SageMaker-Target-Model": "Boston_MA.tar.gz"})
    attacks = [("/invocations", [("X-Amzn-SageMaker-Target-Model", MODEL), *signed], "x-amzn-sagemaker-target-model")]
    singles = [("Host", "x"), ("Content-Type", "application/json"), ("X-Amzn-SageMaker-Target-Model", MODEL),
               ("Authorization", f"Bearer {INVOKE_KEY}"), ("X-Amz-Date", _stamp()),
               ("X-Amz-Content-SHA256", hashlib.sha256(body).hexdigest())]
    for name, value in singles:
        for path in ("/invocations", f"/v2/models/{MODEL}/infer"):
            headers = [*singles, (name, "Bearer mme_not-a-key" if name == "Authorization" else value)]
            attacks.append((path, headers, name.lower()))
    for path, headers, name in attacks:
        with _send_head(gw, "POST", path, [*headers, ("Content-Length", str(len(body)))]) as conn:
            conn.sendall(body)
            status, got, answer = _response(conn)
        assert status == 400, (path, name, status, answer)
        if path.endswith("invocations"):  # botocore's shape on the runtime routes, KServe's elsewhere
            assert got["x-amzn-errortype"] == "ValidationError" and name in json.loads(answer)["Message"].lower()
        else:
            assert name in json.loads(answer)["error"].lower()


def test_a_present_target_model_header_must_be_signed(gw: GatewayProcess) -> None:
    body = v2_request([HOUSE])
    signed = _signed(gw, "/invocations", body, {"Content-Type": "application/json"})  # no TargetModel signed
    with _send_head(gw, "POST", "/invocations", [*signed, ("X-Amzn-SageMaker-Target-Model", MODEL),
                                                 ("Content-Length", str(len(body)))]) as conn:
        conn.sendall(body)
        status, got, answer = _response(conn)
    assert status == 403 and got["x-amzn-errortype"] == "IncompleteSignatureException", answer
    assert "x-amzn-sagemaker-target-model" in json.loads(answer)["Message"].lower()


def test_signed_requests_of_a_mebibyte_pass_and_a_body_that_is_not_the_signed_hash_is_refused(
        gw: GatewayProcess) -> None:
    from botocore.config import Config

    client = boto3.client("sagemaker-runtime", endpoint_url=gw.url, region_name="us-east-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                          config=Config(retries={"max_attempts": 1}))
    body = v2_request([HOUSE]) + b" " * (1 << 20)  # JSON with a mebibyte of trailing blanks
    expected = predict("Houston_TX", np.array([HOUSE])).ravel()
    answer = client.invoke_endpoint(EndpointName="demo", TargetModel=MODEL, ContentType="application/json",
                                    Body=body)
    np.testing.assert_allclose(json.loads(answer["Body"].read())["outputs"][0]["data"], expected, rtol=1e-4)
    other = v2_request([[1.0] * 6]) + b" " * (1 << 20)
    for sent, status_wanted in ((body, 200), (other, 403)):  # signed over the hash of `body`; `other` is not it
        headers = _signed(gw, "/invocations", body, {
            "Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": MODEL,
            "X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()})
        with _send_head(gw, "POST", "/invocations", [*headers, ("Content-Length", str(len(sent)))]) as conn:
            conn.sendall(sent)
            status, got, answer = _response(conn)
        assert status == status_wanted, answer
        if status == 200:
            np.testing.assert_allclose(json.loads(answer)["outputs"][0]["data"], expected, rtol=1e-4)
        else:
            assert got["x-amzn-errortype"] == "InvalidSignatureException"
            assert "x-amz-content-sha256" in json.loads(answer)["Message"].lower()
