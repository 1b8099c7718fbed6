"""Model code gets none of the gateway's secrets (issue 19, item 5), against a real gateway and embedded Triton.

A `model.py` that reports what it can see is served by a gateway started with SigV4, AWS and API-key secrets in
its environment: its own environment holds none of them. Triton's APIs other than health answer only calls
carrying the gateway's secret header, so a local client that is not the gateway cannot load, unload, list or
call models, while everything through the gateway still works. Under `--model-code refuse` an artifact with
code is a 422 naming it, and ONNX is still served.

What this machine cannot show: tests run as root, and root reads any process's /proc/<pid>/environ whatever
its dumpable flag, so the non-dumpable gateway is shown by tests/unit/test_isolation.py in a process that
drops to an unprivileged user, not here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.keys import key_line, new_key
from gateway.triton.process import free_port
from tests.helpers import GatewayProcess, city_artifact, http, tar_gz, v2_request

HOUSE = [[1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]]
SECRETS = {
    "MME_SIGV4_ACCESS_KEY_ID": "AKIDISOLATION",
    "MME_SIGV4_SECRET_ACCESS_KEY": "sigv4-secret-never-for-models",
    "AWS_ACCESS_KEY_ID": "AKIDSTORE",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-never-for-models",
    "AWS_SESSION_TOKEN": "aws-session-never-for-models",
    "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/never-for-models",
}

SPY_CONFIG = b"""backend: "python"
max_batch_size: 0
input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]
output [{ name: "report" data_type: TYPE_STRING dims: [1] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""
# Reports its own environment, and its ancestors' (Triton's, then the gateway's) environ as far as it can read
# them: as root it can, which is why only its own environment is asserted on.
SPY_MODEL = b'''
import json, os
import numpy as np
import triton_python_backend_utils as pb


def _parent(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class TritonPythonModel:
    def execute(self, requests):
        ancestors, pid = [], os.getpid()
        for _ in range(2):
            pid = _parent(pid)
            try:
                with open("/proc/%d/environ" % pid, "rb") as f:
                    readable = True
            except OSError:
                readable = False
            ancestors.append({"pid": pid, "environ_readable": readable})
        report = json.dumps({"env": dict(os.environ), "ancestors": ancestors}).encode()
        return [pb.InferenceResponse([pb.Tensor("report", np.array([report], dtype=np.object_))])
                for _ in requests]
'''
SPY = tar_gz({"config.pbtxt": SPY_CONFIG, "1/model.py": SPY_MODEL})


def _store(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "spy.tar.gz").write_bytes(SPY)
    (root / "Houston_TX.tar.gz").write_bytes(city_artifact("Houston_TX"))
    return root


class Isolated:
    """A gateway with secrets in its environment, its Triton on known ports, and a key with both scopes."""

    def __init__(self, work: Path, extra: list[str]) -> None:
        self.key = new_key()
        self.triton_http = free_port()
        self.triton_grpc = free_port()
        env = {**SECRETS, "MME_API_KEYS": key_line("ops", ("invoke", "manage"), self.key)}
        self.gw = GatewayProcess(["--store", str(_store(work / "store")), "--triton-http-port", str(self.triton_http),
                                  "--triton-grpc-port", str(self.triton_grpc), "--etag-ttl", "0", *extra], work, env)
        self.auth = {"Authorization": f"Bearer {self.key}"}

    def infer(self, key: str, body: bytes) -> tuple[int, dict]:
        status, raw, _ = http("POST", f"{self.gw.url}/v2/models/{key}/infer", body, self.auth)
        return status, json.loads(raw)


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Isolated]:
    iso = Isolated(tmp_path_factory.mktemp("isolated"), [])
    try:
        iso.gw.wait_ready()
        yield iso
    finally:
        iso.gw.stop()


def _spy_report(iso: Isolated) -> dict:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode()
    status, answer = iso.infer("spy.tar.gz", body)
    assert status == 200, answer
    return json.loads(answer["outputs"][0]["data"][0])


def test_model_code_sees_none_of_the_gateways_secrets(isolated: Isolated) -> None:
    report = _spy_report(isolated)
    env = report["env"]
    for name, value in SECRETS.items():
        assert name not in env
        assert value not in json.dumps(env)
    assert not [name for name in env if name.startswith(("MME_", "AWS_"))], sorted(env)
    assert "PATH" in env and "LD_LIBRARY_PATH" in env  # what the stub needs still reaches it
    # The chain the spy walked is stub -> Triton -> gateway; as root both environs read (see the module's doc).
    assert report["ancestors"][1]["pid"] == isolated.gw.proc.pid


def test_tritons_api_refuses_local_clients_without_the_gateways_secret(isolated: Isolated) -> None:
    assert isolated.infer("Houston_TX.tar.gz", v2_request(HOUSE))[0] == 200  # a model is loaded in Triton
    triton = f"http://127.0.0.1:{isolated.triton_http}"
    for method, path in (("POST", "/v2/repository/index"), ("GET", "/v2/models/stats"),
                         ("POST", "/v2/repository/models/anything/load"), ("GET", "/v2")):
        status, raw, _ = http(method, triton + path, b"{}" if method == "POST" else None)
        assert status == 403, (path, status, raw)
    assert http("GET", triton + "/v2/health/live")[0] == 200  # health stays open for probes
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{isolated.triton_grpc}")
    try:
        for call in (client.get_model_repository_index, lambda: client.load_model("anything"),
                     lambda: client.unload_model("anything"), client.get_inference_statistics):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert "restricted" in str(refused.value).lower() or "PERMISSION" in str(refused.value.status()), \
                refused.value
        assert client.is_server_live()
    finally:
        client.close()


def test_everything_through_the_gateway_still_works(isolated: Isolated) -> None:
    gw, auth = isolated.gw, isolated.auth
    status, answer = isolated.infer("Houston_TX.tar.gz", v2_request(HOUSE))
    assert status == 200, answer
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    try:
        headers = {"authorization": auth["Authorization"]}
        inp = grpcclient.InferInput("features", [1, 6], "FP32")
        inp.set_data_from_numpy(np.array(HOUSE, dtype=np.float32))
        result = client.infer("Houston_TX.tar.gz", [inp], headers=headers)
        assert result.as_numpy(answer["outputs"][0]["name"]) is not None
        assert client.get_model_metadata("Houston_TX.tar.gz", headers=headers).name == "Houston_TX.tar.gz"
        assert client.get_inference_statistics("Houston_TX.tar.gz", headers=headers).model_stats
        names = {m.name for m in client.get_model_repository_index(headers=headers).models}
        assert "Houston_TX.tar.gz" in names
        client.unload_model("Houston_TX.tar.gz", headers=headers)
    finally:
        client.close()
    status, raw, _ = http("POST", f"{gw.url}/v2/repository/index", b"{}", auth)
    assert status == 200, raw
    assert http("GET", f"{gw.url}/v2/models/Houston_TX.tar.gz/stats", None, auth)[0] == 200
    assert isolated.infer("Houston_TX.tar.gz", v2_request(HOUSE))[0] == 200  # loads again after the unload


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Isolated]:
    work = tmp_path_factory.mktemp("refusing")
    iso = Isolated(work, ["--model-code", "refuse", "--allow-pickle"])
    (work / "store" / "pickled.tar.gz").write_bytes(tar_gz({"model.joblib": b"\x80\x04K\x01."}))
    (work / "store" / "nested.tar.gz").write_bytes(
        tar_gz({"m/config.pbtxt": b'parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "env.tar.gz" } }',
                "m/model.onnx": b"not used"}))
    try:
        iso.gw.wait_ready()
        yield iso
    finally:
        iso.gw.stop()


@pytest.mark.parametrize(("key", "reason"), [("spy.tar.gz", "model.py"), ("pickled.tar.gz", "model.joblib"),
                                             ("nested.tar.gz", "EXECUTION_ENV_PATH")])
def test_model_code_refused_when_the_operator_says_so(refusing: Isolated, key: str, reason: str) -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}).encode()
    status, answer = refusing.infer(key, body)
    assert status == 422, answer
    assert key in answer["error"] and reason in answer["error"] and "--model-code" in answer["error"], answer
    assert not [e for e in refusing.gw.events("model.loaded") if e["model"] == key]


def test_onnx_is_still_served_when_model_code_is_refused(refusing: Isolated) -> None:
    status, answer = refusing.infer("Houston_TX.tar.gz", v2_request(HOUSE))
    assert status == 200, answer
