"""Requests are bounded before they cost anything, and client mistakes are 4xx with a message that tells the
TargetModel and the cause, never the gateway's insides.

Each test reproduces what one abusive or clumsy client did to the gateway as it was (a 200 MB body, a tiny
body declaring a 7 GB tensor, a gzip bomb, malformed JSON, thousands of bad keys, a model that crashes at
load) and checks the answer and that the gateway and its Triton did not pay for it.
"""

from __future__ import annotations

import gzip
from http.client import HTTPConnection
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from gateway.naming import triton_name_for
from tests.conftest import BUCKET, PREFIX
from tests.helpers import GatewayProcess, http, tar_gz, v2_request

MODEL = "Houston_TX.tar.gz"
HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]
CAP = 64 << 20  # the default --max-request-bytes


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def triton_pid(gw: GatewayProcess) -> int:
    """The embedded tritonserver: the gateway's child whose command is tritonserver."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == gw.proc.pid and b"tritonserver" in cmdline:
            return int(entry)
    raise AssertionError("no tritonserver under the gateway")


def post_streamed(gw: GatewayProcess, path: str, total: int, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST `total` zero bytes with a Content-Length, 1 MiB at a time, and read the answer."""
    conn = HTTPConnection("127.0.0.1", gw.port, timeout=120)
    try:
        conn.putrequest("POST", path)
        for name, value in {**headers, "Content-Length": str(total)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        chunk = bytes(1 << 20)
        sent = 0
        try:
            while sent < total:
                conn.send(chunk[: min(len(chunk), total - sent)])
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway may answer and close before the upload ends
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def warm(s3_gateway: GatewayProcess) -> GatewayProcess:
    assert http("POST", f"{s3_gateway.url}/v2/models/{MODEL}/infer", v2_request([HOUSE]))[0] == 200
    return s3_gateway


def test_a_200_mb_body_is_refused_with_413_without_the_gateway_holding_it(warm: GatewayProcess) -> None:
    before = rss_bytes(warm.proc.pid)
    status, body = post_streamed(warm, f"/v2/models/{MODEL}/infer", 200_000_000, {"Content-Type": "application/json"})
    assert status == 413 and json.loads(body)["code"] == "RequestTooLarge"
    status, body = post_streamed(warm, "/invocations", 200_000_000,
                                 {"Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": MODEL})
    assert status == 413
    status, body = post_streamed(warm, "/v2/models/..%2Fescape/infer", 200_000_000, {})
    assert status in (400, 413)
    grown = rss_bytes(warm.proc.pid) - before
    assert grown < 20 << 20, f"the gateway grew {grown / 2**20:.0f} MiB"
    assert http("POST", f"{warm.url}/v2/models/{MODEL}/infer", v2_request([HOUSE]))[0] == 200


def test_tiny_bodies_declaring_huge_tensors_never_reach_triton(warm: GatewayProcess) -> None:
    triton = triton_pid(warm)
    before = rss_bytes(triton)
    for shape in ([300_000_000, 6], [1_000_000_000, 6], [2**40, 2**40]):
        body = json.dumps({"inputs": [{"name": "features", "shape": shape, "datatype": "FP32", "data": HOUSE}]})
        status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", body.encode())
        assert status in (400, 413), answer
        assert MODEL in json.loads(answer)["error"] and "features" in json.loads(answer)["error"]
    # shape and data disagree, and binary sizes that do not add up
    body = json.dumps({"inputs": [{"name": "features", "shape": [2, 6], "datatype": "FP32", "data": HOUSE}]})
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", body.encode())
    assert status == 400 and "12 elements" in json.loads(answer)["error"]
    header = json.dumps({"inputs": [{"name": "features", "shape": [50_000_000, 6], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 1_200_000_000}}]}).encode()
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", header + bytes(24),
                             {"Inference-Header-Content-Length": str(len(header))})
    assert status in (400, 413), answer
    header = json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 24}}]}).encode()
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", header + bytes(12),
                             {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400, answer
    assert rss_bytes(triton) - before < 50 << 20
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", header + np.array(
        [HOUSE], dtype=np.float32).tobytes(), {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200, answer  # the same request, consistent, is served


def test_compressed_bodies_are_inflated_under_the_cap(warm: GatewayProcess) -> None:
    bomb = gzip.compress(bytes(1 << 30), compresslevel=9)  # ~1 MB that inflates to 1 GiB
    assert len(bomb) < 2 << 20
    before = rss_bytes(warm.proc.pid)
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and json.loads(answer)["code"] == "RequestTooLarge"
    assert rss_bytes(warm.proc.pid) - before < 150 << 20  # at most the cap, briefly
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", v2_request([HOUSE]),
                             {"Content-Encoding": "br"})
    assert status == 415
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", b"\x1f\x8b not gzip",
                             {"Content-Encoding": "gzip"})
    assert status == 400
    for encoding, packed in (("gzip", gzip.compress(v2_request([HOUSE]))), ("deflate", zlib.compress(v2_request([HOUSE])))):
        status, answer, _ = http("POST", f"{warm.url}/v2/models/{MODEL}/infer", packed, {"Content-Encoding": encoding})
        assert status == 200 and json.loads(answer)["model_name"] == MODEL, (encoding, answer)


@pytest.mark.parametrize("body", [b'{"inputs": [', b"hello", b"[1,2,3]", b"{}", b'{"inputs": []}',
                                  b'{"inputs": [{"name": "features", "shape": "1x6", "datatype": "FP32", "data": []}]}',
                                  b'{"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FLOAT", "data": []}]}'])
def test_malformed_requests_are_400_on_every_route(warm: GatewayProcess, body: bytes) -> None:
    for path, headers in ((f"/v2/models/{MODEL}/infer", {}),
                          ("/invocations", {"X-Amzn-SageMaker-Target-Model": MODEL, "Content-Type": "application/json"})):
        status, answer, _ = http("POST", warm.url + path, body, headers)
        assert status == 400, (path, answer)
        message = json.loads(answer).get("error") or json.loads(answer)["Message"]
        assert MODEL in message


def test_grpc_requests_are_checked_the_same_way(warm: GatewayProcess) -> None:
    with grpc.insecure_channel(warm.grpc_url, options=[("grpc.max_send_message_length", -1)]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(shape: list[int], raw: bytes) -> pb.ModelInferRequest:
            message = pb.ModelInferRequest(model_name=MODEL)
            message.inputs.add(name="features", datatype="FP32", shape=shape)
            message.raw_input_contents.append(raw)
            return message

        house = np.array([HOUSE], dtype=np.float32).tobytes()
        for shape, raw, code in (([300_000_000, 6], house, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                 ([2, 6], house, grpc.StatusCode.INVALID_ARGUMENT),
                                 ([1, 6], bytes(CAP + (2 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request(shape, raw), timeout=60)
            assert refused.value.code() == code, refused.value.details()
        answer = stub.ModelInfer(request([1, 6], house), timeout=60)
        assert answer.model_name == MODEL


def test_long_and_unknown_keys_are_refused_and_leave_no_record(warm: GatewayProcess) -> None:
    status, answer, _ = http("POST", f"{warm.url}/v2/models/{'k' * 1024}/infer", v2_request([HOUSE]))
    assert status == 400 and "255 bytes" in json.loads(answer)["error"]
    index_before = http("POST", f"{warm.url}/v2/repository/index", b"{}")[1]

    def call(i: int) -> int:
        key = f"{i:05d}" + "x" * 300 if i % 10 else f"missing/{i:05d}.tar.gz"
        return http("POST", f"{warm.url}/v2/models/{key}/infer", v2_request([HOUSE]))[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(call, range(5000)))
    assert statuses.count(400) == 4500 and statuses.count(404) == 500
    index_after = http("POST", f"{warm.url}/v2/repository/index", b"{}")[1]
    assert json.loads(index_after) == json.loads(index_before)


def test_error_messages_name_the_model_and_never_the_insides(warm: GatewayProcess, s3) -> None:  # type: ignore[no-untyped-def]
    key = "broken/Crashes_At_Load.tar.gz"
    code = ("class TritonPythonModel:\n    def initialize(self, args):\n"
            "        raise RuntimeError('cannot read nothing-here.bin in ' + args['model_repository'])\n")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=tar_gz({
        "config.pbtxt": b'backend: "python"\nmax_batch_size: 0\ninput [{ name: "features" data_type: TYPE_FP32 '
                        b'dims: [-1, 6] }]\noutput [{ name: "price" data_type: TYPE_FP32 dims: [-1, 1] }]\n',
        "1/model.py": code.encode()}))
    internal = triton_name_for(key, f"s3://{BUCKET}/{PREFIX}")
    answers = [
        http("POST", f"{warm.url}/v2/models/{key}/infer", v2_request([HOUSE])),
        http("POST", f"{warm.url}/invocations", v2_request([HOUSE]),
             {"X-Amzn-SageMaker-Target-Model": key, "Content-Type": "application/json"}),
        http("GET", f"{warm.url}/v2/models/{key}/config"),
        http("POST", f"{warm.url}/v2/repository/index", b"{}"),
        http("GET", f"{warm.url}/models/{key}"),
    ]
    texts = [body.decode() for _, body, _ in answers]
    with grpc.insecure_channel(warm.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = pb.ModelInferRequest(model_name=key)
        message.inputs.add(name="features", datatype="FP32", shape=[1, 6])
        message.raw_input_contents.append(np.array([HOUSE], dtype=np.float32).tobytes())
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(message, timeout=60)
        texts.append(refused.value.details())
    assert [status for status, _, _ in answers][:3] == [422, 424, 422]
    assert "nothing-here.bin" in texts[0] and key in texts[0]  # the cause and the model, for the model's owner
    for text in texts:
        assert internal not in text, text
        assert "Traceback" not in text and 'File "' not in text, text
        assert str(warm.cache_dir) not in text and "/tmp/" not in text and "127.0.0.1" not in text, text
