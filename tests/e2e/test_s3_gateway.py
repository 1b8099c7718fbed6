"""End to end against a real tritonserver and S3 over HTTP (moto's server): TargetModel -> S3 -> NVMe -> Triton."""

from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pytest
import tritonclient.http as httpclient

from gateway.demo import LATE_CITY, predict
from tests.helpers import GatewayProcess, city_artifact, http, tar_gz, v2_request

HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]


def infer(gw: GatewayProcess, key: str, rows: list[list[float]] | None = None) -> tuple[int, dict]:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request(rows or [HOUSE]),
                           {"Content-Type": "application/json"})
    return status, json.loads(body)


def price(answer: dict) -> float:
    return float(answer["outputs"][0]["data"][0])


def assert_prices(answer: dict, city: str, rows: list[list[float]]) -> None:
    expected = predict(city, np.array(rows)).ravel()
    got = np.array(answer["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_cold_call_stages_and_loads_then_warm_call_skips_both(s3_gateway: GatewayProcess) -> None:
    key = "Chicago_IL.tar.gz"
    status, answer = infer(s3_gateway, key)
    assert status == 200, answer
    assert_prices(answer, "Chicago_IL", [HOUSE])
    assert answer["model_name"] == key  # the client's name, not Triton's internal one

    downloaded = [e for e in s3_gateway.events("model.downloaded") if e["model"] == key]
    loaded = [e for e in s3_gateway.events("model.loaded") if e["model"] == key]
    assert len(downloaded) == 1 and downloaded[0]["download_s"] >= 0 and downloaded[0]["bytes"] > 0
    assert len(loaded) == 1 and loaded[0]["load_s"] > 0 and loaded[0]["download_s"] is not None

    hits_before = s3_gateway.metric("mme_model_cache_requests_total", {"result": "hit"})
    rows = [HOUSE, [1978.0, 2973.0, 2.0, 1.5, 0.99, 1.0]]
    status, answer = infer(s3_gateway, key, rows)
    assert status == 200
    assert_prices(answer, "Chicago_IL", rows)
    assert len([e for e in s3_gateway.events("model.downloaded") if e["model"] == key]) == 1
    assert len([e for e in s3_gateway.events("model.loaded") if e["model"] == key]) == 1
    assert s3_gateway.metric("mme_model_cache_requests_total", {"result": "hit"}) == hits_before + 1


def test_model_uploaded_while_running_answers_without_restart(s3_gateway: GatewayProcess, put_s3) -> None:
    key = f"{LATE_CITY}.tar.gz"
    status, answer = infer(s3_gateway, key)
    assert status == 404 and key in answer["error"]
    put_s3(key, city_artifact(LATE_CITY))
    status, answer = infer(s3_gateway, key)
    assert status == 200, answer
    assert_prices(answer, LATE_CITY, [HOUSE])


def test_updated_model_under_a_new_name_answers_while_the_old_one_still_does(s3_gateway, put_s3) -> None:
    status, old = infer(s3_gateway, "Houston_TX.tar.gz")
    assert status == 200
    put_s3("Houston_TX-v2.tar.gz", city_artifact("Houston_TX-retrained"))
    status, new = infer(s3_gateway, "Houston_TX-v2.tar.gz")
    assert status == 200, new
    assert_prices(new, "Houston_TX-retrained", [HOUSE])
    assert price(new) != pytest.approx(price(old))
    status, again = infer(s3_gateway, "Houston_TX.tar.gz")
    assert status == 200 and price(again) == pytest.approx(price(old))


def test_nested_keys_work_as_paths_and_in_the_sagemaker_header(s3_gateway, put_s3) -> None:
    put_s3("texas/Austin_TX.tar.gz", city_artifact("Austin_TX"))
    status, answer = infer(s3_gateway, "texas/Austin_TX.tar.gz")
    assert status == 200, answer
    assert_prices(answer, "Austin_TX", [HOUSE])
    status, body, _ = http("POST", f"{s3_gateway.url}/invocations", v2_request([HOUSE]),
                           {"X-Amzn-SageMaker-Target-Model": "texas/Austin_TX.tar.gz",
                            "Content-Type": "application/json"})
    assert status == 200
    assert_prices(json.loads(body), "Austin_TX", [HOUSE])


def test_unknown_model_is_a_404_that_names_it(s3_gateway: GatewayProcess) -> None:
    status, answer = infer(s3_gateway, "Atlantis_XX.tar.gz")
    assert status == 404
    assert "Atlantis_XX.tar.gz" in answer["error"]
    assert answer["code"] == "ModelNotFound"


@pytest.mark.parametrize(
    "key",
    ["../outside.tar.gz", "a/../../outside.tar.gz", "/etc/passwd", "a//b.tar.gz", "a\\b.tar.gz"],
)
def test_keys_that_escape_the_prefix_are_refused_with_400(s3_gateway: GatewayProcess, key: str) -> None:
    status, body, _ = http("POST", f"{s3_gateway.url}/invocations", v2_request([HOUSE]),
                           {"X-Amzn-SageMaker-Target-Model": key, "Content-Type": "application/json"})
    assert status == 400, body
    assert json.loads(body)["code"] == "InvalidModelKey"


def _escape_member() -> bytes:
    return tar_gz({"../evil.onnx": b"x", "model.onnx": b"y"})


def _link_out() -> bytes:
    link = tarfile.TarInfo("model.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return tar_gz({}, [link])


BAD_ARTIFACTS = {
    "escape.tar.gz": (_escape_member, "outside the model directory"),
    "link.tar.gz": (_link_out, "points outside"),
    "corrupt.tar.gz": (lambda: b"\x1f\x8b\x08\x00" + os.urandom(200), "not a readable .tar.gz"),
    "empty-model.tar.gz": (lambda: tar_gz({"README.txt": b"hello"}), "holds no model"),
    "not-onnx.tar.gz": (lambda: tar_gz({"model.onnx": b"this is not protobuf"}), "not a readable ONNX"),
}


@pytest.mark.parametrize("name", sorted(BAD_ARTIFACTS))
def test_bad_artifacts_are_refused_with_a_clear_4xx_and_others_keep_answering(s3_gateway, put_s3, name) -> None:
    make, reason = BAD_ARTIFACTS[name]
    put_s3(f"bad/{name}", make())
    status, answer = infer(s3_gateway, f"bad/{name}")
    assert status == 422, answer
    assert f"bad/{name}" in answer["error"] and reason in answer["error"]
    # Asked again, the same bytes are refused at once from memory, not downloaded again.
    downloads = s3_gateway.metric("mme_model_downloads_total")
    assert infer(s3_gateway, f"bad/{name}")[0] == 422
    assert s3_gateway.metric("mme_model_downloads_total") == downloads
    status, answer = infer(s3_gateway, "LosAngeles_CA.tar.gz")
    assert status == 200
    assert_prices(answer, "LosAngeles_CA", [HOUSE])


def test_a_model_whose_code_fails_to_load_is_refused_and_triton_keeps_serving(s3_gateway, put_s3) -> None:
    config = b'backend: "python"\ninput [{ name: "x" data_type: TYPE_FP32 dims: [-1] }]\n' \
             b'output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]\n'
    code = b"class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('boom at init')\n"
    put_s3("broken-python.tar.gz", tar_gz({"config.pbtxt": config, "1/model.py": code}))
    status, answer = infer(s3_gateway, "broken-python.tar.gz")
    assert status == 422
    assert "boom at init" in answer["error"] and answer["code"] == "ModelLoadFailed"
    assert infer(s3_gateway, "Chicago_IL.tar.gz")[0] == 200
    assert http("GET", s3_gateway.url + "/v2/health/ready")[0] == 200


def test_python_backend_artifact_with_its_own_config(s3_gateway, put_s3) -> None:
    config = b'name: "whatever"\nbackend: "python"\nmax_batch_size: 0\n' \
             b'input [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n' \
             b'output [{ name: "total" data_type: TYPE_FP32 dims: [-1, 1] }]\n'
    code = (b"import numpy as np\nimport triton_python_backend_utils as pb\n"
            b"class TritonPythonModel:\n"
            b"    def execute(self, requests):\n"
            b"        out = []\n"
            b"        for r in requests:\n"
            b"            x = pb.get_input_tensor_by_name(r, 'features').as_numpy()\n"
            b"            out.append(pb.InferenceResponse([pb.Tensor('total', x.sum(axis=1, keepdims=True))]))\n"
            b"        return out\n")
    put_s3("summer.tar.gz", tar_gz({"summer/config.pbtxt": config, "summer/model.py": code}))
    status, answer = infer(s3_gateway, "summer.tar.gz")
    assert status == 200, answer
    assert answer["outputs"][0]["data"] == [pytest.approx(sum(HOUSE))]


def test_triton_model_directory_with_an_onnxruntime_config_is_served(s3_gateway, put_s3) -> None:
    from gateway.demo import onnx_model
    config = b'platform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
    put_s3("repo-layout.tar.gz",
           tar_gz({"config.pbtxt": config, "3/model.onnx": onnx_model("Denver_CO").SerializeToString()}))
    status, answer = infer(s3_gateway, "repo-layout.tar.gz")
    assert status == 200, answer
    assert_prices(answer, "Denver_CO", [HOUSE])


def test_tritonclient_binary_tensors_pass_through(s3_gateway: GatewayProcess) -> None:
    client = httpclient.InferenceServerClient(url=s3_gateway.url.removeprefix("http://"))
    houses = np.array([HOUSE, [2005.0, 1800.0, 3.0, 2.0, 0.3, 1.0]], dtype=np.float32)
    inp = httpclient.InferInput("features", list(houses.shape), "FP32")
    inp.set_data_from_numpy(houses, binary_data=True)
    out = httpclient.InferRequestedOutput("price", binary_data=True)
    result = client.infer("Chicago_IL.tar.gz", [inp], outputs=[out])
    assert result.get_response()["model_name"] == "Chicago_IL.tar.gz"
    np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Chicago_IL", houses).ravel(), rtol=1e-4)
    client.close()
