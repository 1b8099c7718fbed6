"""No answer on any protocol, errors included, names the internal Triton model: clients know TargetModels.

Each test calls one protocol the ways a client would, right and wrong (an input the model does not have,
an output it does not make, a shape it refuses), and looks for the Triton name in everything that came back.
"""

from __future__ import annotations

import json

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from tests.helpers import GatewayProcess, city_artifact, http, v2_request

KEY = "names/Hidden_ZZ.tar.gz"
HOUSE = [2001.0, 2500.0, 4.0, 2.0, 0.5, 2.0]


@pytest.fixture(scope="module")
def internal(s3_gateway: GatewayProcess, s3) -> str:  # type: ignore[no-untyped-def]
    """The model loaded, and the name Triton knows it by (from the gateway's own log, the operator's view)."""
    from tests.conftest import BUCKET, PREFIX

    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{KEY}", Body=city_artifact("Hidden_ZZ"))
    assert http("POST", f"{s3_gateway.url}/v2/models/{KEY}/infer", v2_request([HOUSE]))[0] == 200
    names = [e["triton_name"] for e in s3_gateway.events("model.loaded") if e["model"] == KEY]
    assert names and names[-1] != KEY
    return names[-1]


def _wrong_input() -> bytes:
    return json.dumps({"inputs": [{"name": "not_an_input", "shape": [1, 6], "datatype": "FP32", "data": HOUSE}]}).encode()


def _wrong_output() -> bytes:
    body = json.loads(v2_request([HOUSE]))
    body["outputs"] = [{"name": "not_an_output"}]
    return json.dumps(body).encode()


def _wrong_shape() -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": [1, 5], "datatype": "FP32", "data": HOUSE[:5]}]}).encode()


def test_kserve_http(s3_gateway: GatewayProcess, internal: str) -> None:
    url = f"{s3_gateway.url}/v2/models/{KEY}"
    answers = [
        http("POST", url + "/infer", v2_request([HOUSE])),
        http("POST", url + "/infer", _wrong_input()),
        http("POST", url + "/infer", _wrong_output()),
        http("POST", url + "/infer", _wrong_shape()),
        http("POST", url + "/versions/7/infer", v2_request([HOUSE])),
        http("GET", url), http("GET", url + "/config"), http("GET", url + "/stats"),
        http("GET", url + "/versions/7"), http("GET", url + "/ready"),
        http("POST", f"{s3_gateway.url}/v2/repository/index", b"{}"),
    ]
    statuses = [status for status, _, _ in answers]
    assert statuses[0] == 200 and statuses[5:8] == [200, 200, 200]
    assert all(status >= 400 for status in statuses[1:5]), statuses  # the wrong calls were refused
    for status, body, headers in answers:
        assert internal.encode() not in body, (status, body)
        assert internal not in json.dumps(headers)
    assert KEY.encode() in answers[1][1]  # the error names the model the client knows


def test_kserve_grpc(s3_gateway: GatewayProcess, internal: str) -> None:
    seen: list[str] = []
    with grpc.insecure_channel(s3_gateway.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(name: str = "features", columns: int = 6, outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
            req = pb.ModelInferRequest(model_name=KEY)
            tensor = req.inputs.add(name=name, datatype="FP32", shape=[1, columns])
            tensor.contents.fp32_contents.extend(HOUSE[:columns])
            for output in outputs:
                req.outputs.add(name=output)
            return req

        calls = [
            lambda: stub.ModelInfer(request(), timeout=60),
            lambda: stub.ModelInfer(request(name="not_an_input"), timeout=60),
            lambda: stub.ModelInfer(request(outputs=("not_an_output",)), timeout=60),
            lambda: stub.ModelInfer(request(columns=5), timeout=60),
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=KEY), timeout=60),
            lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=KEY, version="7"), timeout=60),
            lambda: stub.ModelConfig(pb.ModelConfigRequest(name=KEY), timeout=60),
            lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name=KEY), timeout=60),
            lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=60),
            lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=60),
        ]
        failures = 0
        for call in calls:
            try:
                seen.append(str(call()))
            except grpc.RpcError as exc:
                failures += 1
                seen.append(f"{exc.code()} {exc.details()}")
        stream = list(stub.ModelStreamInfer(iter([request(), request(name="not_an_input")]), timeout=60))
        seen += [str(answer) for answer in stream]
    assert failures >= 4  # the wrong calls were refused
    assert any(KEY in text and "not_an_input" in text for text in seen)
    leaked = [text for text in seen if internal in text]
    assert leaked == []


def test_sagemaker_runtime_and_container(s3_gateway: GatewayProcess, internal: str) -> None:
    invoke = f"{s3_gateway.url}/endpoints/any/invocations"
    json_type = {"X-Amzn-SageMaker-Target-Model": KEY, "Content-Type": "application/json"}
    csv_type = {"X-Amzn-SageMaker-Target-Model": KEY, "Content-Type": "text/csv"}
    answers = [
        http("POST", invoke, v2_request([HOUSE]), json_type),
        http("POST", invoke, _wrong_input(), json_type),
        http("POST", invoke, _wrong_shape(), json_type),
        http("POST", invoke, b"1,2,3,4,5,6\n", csv_type),
        http("POST", invoke, b"1,2,3\n", csv_type),
        http("GET", f"{s3_gateway.url}/models"),
        http("GET", f"{s3_gateway.url}/models/{KEY}"),
    ]
    statuses = [status for status, _, _ in answers]
    assert statuses[0] == 200 and statuses[3] == 200 and statuses[5:] == [200, 200], statuses
    assert statuses[1] >= 400 and statuses[2] >= 400 and statuses[4] >= 400
    for status, body, headers in answers:
        assert internal.encode() not in body, (status, body)
        assert internal not in json.dumps(headers)

