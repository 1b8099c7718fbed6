"""The SageMaker edges end to end: boto3's sagemaker-runtime client against the gateway (real Triton, moto S3),
and the multi-model container API over plain HTTP. The error shapes are also checked through botocore's own
response pipeline for the errors a healthy test gateway cannot be made to produce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import boto3
import numpy as np
import pytest
import tritonclient.http as httpclient
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from onnx import TensorProto, helper

from gateway.api.sagemaker_runtime import SageMakerError, runtime_response, runtime_error
from gateway.demo import onnx_model, predict
from gateway.errors import (
    GatewayError,
    InsufficientMemory,
    MemoryBusy,
    InvalidModelKey,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    StoreUnavailable,
    Throttled,
    TritonUnavailable,
)
from gateway.redact import public
from tests.helpers import GatewayProcess, http, tar_gz, v2_request

HOUSES = [[1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0], [1978.0, 2973.0, 2.0, 1.5, 0.99, 1.0]]
CSV = b"1994,3188,5,1.5,1.62,3\n1978,2973,2,1.5,0.99,1\n"
NO_RETRIES = Config(retries={"mode": "standard", "total_max_attempts": 1}, read_timeout=120)


@pytest.fixture(scope="module")
def runtime(s3_gateway: GatewayProcess):  # type: ignore[no-untyped-def]
    return boto3.client("sagemaker-runtime", endpoint_url=s3_gateway.url, region_name="us-east-1", config=NO_RETRIES)


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def csv_prices(body: bytes) -> np.ndarray:
    return np.array([float(line) for line in body.decode().splitlines()], dtype=np.float32)


def invoke(runtime, target: str, body: bytes, content_type: str, **kwargs: Any) -> dict:  # type: ignore[no-untyped-def]
    return runtime.invoke_endpoint(EndpointName="houses", TargetModel=target, ContentType=content_type, Body=body,
                                   **kwargs)


# -- the runtime API with boto3 --------------------------------------------------------------------------


def test_csv_rows_are_answered_with_csv_prices(runtime) -> None:
    resp = invoke(runtime, "Houston_TX.tar.gz", CSV, "text/csv")
    assert resp["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert resp["ContentType"].startswith("text/csv")
    assert resp["InvokedProductionVariant"] == "AllTraffic"
    lines = resp["Body"].read()
    assert len(lines.decode().splitlines()) == 2
    np.testing.assert_allclose(csv_prices(lines), predict("Houston_TX", np.array(HOUSES)).ravel(), rtol=1e-4)


def test_kserve_v2_json_passes_through_and_custom_attributes_are_echoed(runtime) -> None:
    attrs = "trace_id=abc-123,c000b4f9-df62-4c85-a0bf-7c525f9104a4"
    resp = invoke(runtime, "Seattle_WA.tar.gz", v2_request(HOUSES), "application/json", CustomAttributes=attrs)
    assert resp["ContentType"] == "application/json"
    assert resp["CustomAttributes"] == attrs
    answer = json.loads(resp["Body"].read())
    assert answer["outputs"][0]["name"] == "price" and answer["outputs"][0]["shape"] == [2, 1]
    np.testing.assert_allclose(answer["outputs"][0]["data"], predict("Seattle_WA", np.array(HOUSES)).ravel(),
                               rtol=1e-4)


def test_accept_header_chooses_the_answer_form(runtime) -> None:
    expected = predict("Houston_TX", np.array(HOUSES)).ravel()
    as_csv = invoke(runtime, "Houston_TX.tar.gz", v2_request(HOUSES), "application/json", Accept="text/csv")
    assert as_csv["ContentType"].startswith("text/csv")
    np.testing.assert_allclose(csv_prices(as_csv["Body"].read()), expected, rtol=1e-4)
    as_json = invoke(runtime, "Houston_TX.tar.gz", CSV, "text/csv", Accept="application/json")
    assert as_json["ContentType"] == "application/json"
    np.testing.assert_allclose(json.loads(as_json["Body"].read())["outputs"][0]["data"], expected, rtol=1e-4)
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "Houston_TX.tar.gz", CSV, "text/csv", Accept="application/x-npy")
    assert "application/x-npy" in str(err.value)


def test_sagemaker_triton_binary_form_round_trips(runtime, s3_gateway: GatewayProcess) -> None:
    houses = np.array(HOUSES, dtype=np.float32)
    inp = httpclient.InferInput("features", list(houses.shape), "FP32")
    inp.set_data_from_numpy(houses, binary_data=True)
    out = httpclient.InferRequestedOutput("price", binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
    resp = invoke(runtime, "Houston_TX.tar.gz", body,
                  f"application/vnd.sagemaker-triton.binary+json;json-header-size={header_length}")
    content_type = resp["ContentType"]
    assert content_type.startswith("application/vnd.sagemaker-triton.binary+json;json-header-size=")
    result = httpclient.InferenceServerClient.parse_response_body(
        resp["Body"].read(), header_length=int(content_type.rsplit("=", 1)[1]))
    np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Houston_TX", houses).ravel(), rtol=1e-4)
    # KServe's own binary form (the header length in its header) passes through a plain HTTP call too.
    status, raw, headers = http("POST", f"{s3_gateway.url}/invocations", body,
                                {"X-Amzn-SageMaker-Target-Model": "Houston_TX.tar.gz",
                                 "Content-Type": "application/octet-stream",
                                 "Inference-Header-Content-Length": str(header_length)})
    assert status == 200, raw
    size = int(lower(headers)["content-type"].rsplit("=", 1)[1])
    result = httpclient.InferenceServerClient.parse_response_body(raw, header_length=size)
    np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Houston_TX", houses).ravel(), rtol=1e-4)


def test_unknown_target_model_is_a_validation_error_naming_it(runtime) -> None:
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "Atlantis_XX.tar.gz", CSV, "text/csv")
    assert "Atlantis_XX.tar.gz" in str(err.value) and "Failed to download model data" in str(err.value)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_key_outside_the_prefix_is_a_validation_error(runtime) -> None:
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "../outside.tar.gz", CSV, "text/csv")
    assert "../outside.tar.gz" in str(err.value)


def test_a_model_that_fails_to_load_is_a_model_error(runtime, put_s3) -> None:
    config = b'backend: "python"\ninput [{ name: "x" data_type: TYPE_FP32 dims: [-1] }]\n' \
             b'output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]\n'
    code = b"class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('sm boom')\n"
    put_s3("sm/broken-python.tar.gz", tar_gz({"config.pbtxt": config, "1/model.py": code}))
    with pytest.raises(runtime.exceptions.ModelError) as err:
        invoke(runtime, "sm/broken-python.tar.gz", v2_request([[1.0]], "x"), "application/json")
    assert "sm boom" in str(err.value) and "sm/broken-python.tar.gz" in str(err.value)
    assert err.value.response["OriginalStatusCode"] == 422
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 424


def test_an_error_answered_by_the_model_is_a_model_error_with_its_status(runtime) -> None:
    with pytest.raises(runtime.exceptions.ModelError) as err:
        invoke(runtime, "Houston_TX.tar.gz", v2_request(HOUSES, input_name="nope"), "application/json")
    assert err.value.response["OriginalStatusCode"] == 400
    assert "nope" in err.value.response["OriginalMessage"]


def _two_input_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"])], "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 6]) for n in ("a", "b")],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 6])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return tar_gz({"model.onnx": model.SerializeToString()})


def test_csv_for_a_model_without_one_fp32_matrix_input_is_a_validation_error(runtime, put_s3) -> None:
    put_s3("sm/two-inputs.tar.gz", _two_input_model())
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "sm/two-inputs.tar.gz", CSV, "text/csv")
    assert "exactly one input" in str(err.value) and "sm/two-inputs.tar.gz" in str(err.value)


def test_csv_rows_of_the_wrong_width_are_a_validation_error(runtime) -> None:
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "Houston_TX.tar.gz", b"1994,3188,5,1.5,1.62\n", "text/csv")
    assert "takes 6 values per row but the CSV rows have 5" in str(err.value)
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "Houston_TX.tar.gz", b"year,sqft,beds,baths,lot,garage\n1,2,3,4,5,6\n", "text/csv")
    assert "no header row" in str(err.value)


def test_unsupported_content_type_and_missing_target_model(runtime, s3_gateway: GatewayProcess) -> None:
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        invoke(runtime, "Houston_TX.tar.gz", b"\x93NUMPY", "application/x-npy")
    assert "application/x-npy" in str(err.value)
    with pytest.raises(runtime.exceptions.ValidationError) as err:
        runtime.invoke_endpoint(EndpointName="houses", ContentType="text/csv", Body=CSV)
    assert "TargetModel" in str(err.value)


def test_plain_http_invocations_keeps_the_gateway_code_too(s3_gateway: GatewayProcess) -> None:
    status, body, headers = http("POST", f"{s3_gateway.url}/invocations", CSV,
                                 {"X-Amzn-SageMaker-Target-Model": "Houston_TX.tar.gz", "Content-Type": "text/csv"})
    assert status == 200 and lower(headers)["x-amzn-invoked-production-variant"] == "AllTraffic"
    np.testing.assert_allclose(csv_prices(body), predict("Houston_TX", np.array(HOUSES)).ravel(), rtol=1e-4)
    status, body, headers = http("POST", f"{s3_gateway.url}/endpoints/houses/invocations", CSV,
                                 {"X-Amzn-SageMaker-Target-Model": "Atlantis_XX.tar.gz", "Content-Type": "text/csv"})
    answer = json.loads(body)
    assert status == 400 and lower(headers)["x-amzn-errortype"] == "ValidationError"
    assert answer["__type"] == "ValidationError" and answer["code"] == "ModelNotFound"


# -- every error shape through botocore's own response pipeline ---------------------------------------------


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._body


ERRORS: list[tuple[GatewayError, str, int]] = [
    (InvalidModelKey("TargetModel '../x' escapes"), "ValidationError", 400),
    (ModelNotFound("model 'x.tar.gz' not found in store s3://b/p"), "ValidationError", 400),
    (ModelLoadFailed("model 'x.tar.gz' failed to load in Triton: boom"), "ModelError", 424),
    (InsufficientMemory("model 'x.tar.gz' needs 9 bytes, more than the whole memory budget"), "ModelError", 424),
    (MemoryBusy("model 'x.tar.gz' needs 9 bytes but the loaded models are serving requests"),
     "ServiceUnavailable", 503),
    (ModelNotReady("model 'x.tar.gz' is still loading; retry shortly"), "ModelNotReadyException", 429),
    (Throttled("all 4 invocation slots stayed busy"), "ThrottlingException", 400),
    (TritonUnavailable("Triton did not answer"), "ServiceUnavailable", 503),
    (StoreUnavailable("store s3://b/p refused 'x.tar.gz': AccessDenied"), "InternalDependencyException", 530),
    (GatewayError("something else"), "InternalFailure", 500),
]


@pytest.mark.parametrize("exc, code, status", ERRORS, ids=[e[1] + "-" + type(e[0]).__name__ for e in ERRORS])
def test_botocore_raises_the_named_exception_for_every_gateway_error(exc, code, status) -> None:
    err: SageMakerError = runtime_error(exc, "x.tar.gz")
    assert (err.code, err.status) == (code, status)
    reply = runtime_response(err, "req-1", "attr=1")
    client = boto3.client("sagemaker-runtime", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing", config=NO_RETRIES)
    client.meta.events.register(
        "before-send.*", lambda request, **_: AWSResponse(request.url, reply.status_code, dict(reply.headers),
                                                           _Raw(reply.body)))
    with pytest.raises(client.exceptions.ClientError) as raised:
        client.invoke_endpoint(EndpointName="e", TargetModel="x.tar.gz", Body=b"{}")
    error = raised.value.response
    assert error["Error"]["Code"] == code and error["ResponseMetadata"]["HTTPStatusCode"] == status
    assert public(exc.message) in error["Error"]["Message"] and error["ResponseMetadata"]["RequestId"] == "req-1"
    modeled = getattr(client.exceptions, code, None)
    if code != "ThrottlingException":  # not modelled for this service; SDK retry logic keys on the code
        assert modeled is not None and isinstance(raised.value, modeled)
    if code == "ModelError":
        assert error["OriginalStatusCode"] == exc.status and error["OriginalMessage"] == exc.message


# -- the multi-model container API -------------------------------------------------------------------------


def _model_dir(root: Path, city: str) -> Path:
    path = root / city / "model"
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(onnx_model(city).SerializeToString())
    return path


def _register(gw: GatewayProcess, name: str, url: str) -> tuple[int, dict]:
    status, body, _ = http("POST", f"{gw.url}/models", json.dumps({"model_name": name, "url": url}).encode(),
                           {"Content-Type": "application/json"})
    return status, json.loads(body)


def test_ping(s3_gateway: GatewayProcess) -> None:
    status, body, _ = http("GET", f"{s3_gateway.url}/ping")
    assert status == 200 and json.loads(body)["status"] == "Healthy"


def test_container_api_register_invoke_get_delete(s3_gateway: GatewayProcess, model_root: Path) -> None:
    url = str(_model_dir(model_root, "Denver_CO"))
    status, answer = _register(s3_gateway, "sm-denver", url)
    assert status == 200, answer
    assert answer["modelName"] == "sm-denver" and answer["modelUrl"] == url and answer["state"] == "ready"

    status, body, _ = http("POST", f"{s3_gateway.url}/models/sm-denver/invoke", v2_request(HOUSES),
                           {"Content-Type": "application/json", "X-Amzn-SageMaker-Target-Model": "denver.tar.gz"})
    assert status == 200, body
    expected = predict("Denver_CO", np.array(HOUSES)).ravel()
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], expected, rtol=1e-4)
    status, body, headers = http("POST", f"{s3_gateway.url}/models/sm-denver/invoke", CSV,
                                 {"Content-Type": "text/csv", "X-Amzn-SageMaker-Custom-Attributes": "a=b"})
    assert status == 200 and lower(headers)["content-type"].startswith("text/csv")
    assert lower(headers)["x-amzn-sagemaker-custom-attributes"] == "a=b"
    np.testing.assert_allclose(csv_prices(body), expected, rtol=1e-4)

    status, answer = _register(s3_gateway, "sm-denver", url)
    assert status == 409 and "sm-denver" in answer["error"]

    status, body, _ = http("GET", f"{s3_gateway.url}/models/sm-denver")
    got = json.loads(body)
    assert status == 200 and got["modelName"] == "sm-denver" and got["modelUrl"] == url
    assert got["state"] == "ready" and got["hits"] >= 1 and got["registered"] is True

    status, body, _ = http("DELETE", f"{s3_gateway.url}/models/sm-denver")
    assert status == 200, body
    status, body, _ = http("POST", f"{s3_gateway.url}/models/sm-denver/invoke", v2_request(HOUSES),
                           {"Content-Type": "application/json"})
    assert status == 404 and "sm-denver" in json.loads(body)["error"]
    assert http("GET", f"{s3_gateway.url}/models/sm-denver")[0] == 404
    assert http("DELETE", f"{s3_gateway.url}/models/sm-denver")[0] == 404


def test_container_api_refusals(s3_gateway: GatewayProcess, model_root: Path) -> None:
    status, answer = _register(s3_gateway, "sm-missing", str(model_root / "nowhere" / "model"))
    assert status == 404 and "sm-missing" in answer["error"] and str(model_root) not in answer["error"]
    assert http("GET", f"{s3_gateway.url}/models/sm-missing")[0] == 404
    (model_root / "junk").mkdir()
    (model_root / "junk" / "README.txt").write_text("no model here")
    status, answer = _register(s3_gateway, "sm-junk", str(model_root / "junk"))
    assert status == 422 and "sm-junk" in answer["error"]
    assert "README.txt" not in answer["error"] and str(model_root) not in answer["error"]  # no listing
    status, body, _ = http("POST", f"{s3_gateway.url}/models", b"{not json", {"Content-Type": "application/json"})
    assert status == 400
    status, body, _ = http("POST", f"{s3_gateway.url}/models", b'{"model_name": "x"}')
    assert status == 400 and "url" in json.loads(body)["error"]
    assert http("GET", f"{s3_gateway.url}/models?max_results=0")[0] == 400
    assert http("GET", f"{s3_gateway.url}/models?next_page_token=garbage")[0] == 400


def test_list_models_pages_through_registered_and_store_models(s3_gateway: GatewayProcess,
                                                               model_root: Path) -> None:
    url = str(_model_dir(model_root, "Boston_MA"))
    assert _register(s3_gateway, "sm-page", url)[0] == 200
    assert http("POST", f"{s3_gateway.url}/invocations", CSV,
                {"X-Amzn-SageMaker-Target-Model": "Houston_TX.tar.gz", "Content-Type": "text/csv"})[0] == 200
    try:
        status, body, _ = http("GET", f"{s3_gateway.url}/models?max_results=1")
        first = json.loads(body)
        assert status == 200 and len(first["models"]) == 1 and first["nextPageToken"]
        status, body, _ = http("GET", f"{s3_gateway.url}/models?max_results=1&next_page_token={first['nextPageToken']}")
        second = json.loads(body)
        assert status == 200 and len(second["models"]) == 1
        assert second["models"][0]["modelName"] != first["models"][0]["modelName"]

        seen, token = [], None
        while True:
            query = "max_results=1" + (f"&next_page_token={token}" if token else "")
            page = json.loads(http("GET", f"{s3_gateway.url}/models?{query}")[1])
            assert len(page["models"]) == 1
            seen.append(page["models"][0])
            token = page.get("nextPageToken")
            if not token:
                break
        names = [m["modelName"] for m in seen]
        assert len(names) == len(set((m["modelName"], m["registered"]) for m in seen))
        by_name = {m["modelName"]: m for m in seen}
        assert by_name["sm-page"]["modelUrl"] == url and by_name["sm-page"]["registered"] is True
        houston = by_name["Houston_TX.tar.gz"]
        assert houston["registered"] is False and houston["modelUrl"].endswith("/Houston_TX.tar.gz")
        assert houston["state"] == "ready" and "tritonName" not in houston  # internal names stay inside
        everything = json.loads(http("GET", f"{s3_gateway.url}/models")[1])
        assert [m["modelName"] for m in everything["models"]] == names and "nextPageToken" not in everything
    finally:
        http("DELETE", f"{s3_gateway.url}/models/sm-page")


def test_store_model_can_be_inspected_and_unloaded(s3_gateway: GatewayProcess, runtime) -> None:
    invoke(runtime, "Seattle_WA.tar.gz", CSV, "text/csv")
    status, body, _ = http("GET", f"{s3_gateway.url}/models/Seattle_WA.tar.gz")
    assert status == 200 and json.loads(body)["state"] == "ready"
    assert http("DELETE", f"{s3_gateway.url}/models/Seattle_WA.tar.gz")[0] == 200
    status, body, _ = http("GET", f"{s3_gateway.url}/models/Seattle_WA.tar.gz")
    assert status == 200 and json.loads(body)["state"] == "staged"
    assert http("DELETE", f"{s3_gateway.url}/models/Seattle_WA.tar.gz")[0] == 404
