"""KServe v2 over HTTP with the clients users already have: tritonclient (sync and aio) and perf_analyzer."""

from __future__ import annotations

import asyncio
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from gateway.demo import predict
from tests.helpers import GatewayProcess, city_artifact, http, polled

HOUSES = np.array([[1994, 3188, 5, 1.5, 1.62, 3], [1978, 2973, 2, 1.5, 0.99, 1]], dtype=np.float32)
PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"


def _client(gw: GatewayProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=gw.url.removeprefix("http://"))


def test_server_health_and_metadata(s3_gateway: GatewayProcess) -> None:
    client = _client(s3_gateway)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "mme-gateway" and "binary_tensor_data" in meta["extensions"]
    assert "statistics" in meta["extensions"]


def test_metadata_on_a_cold_model_loads_it_and_speaks_its_target_name(s3_gateway, put_s3) -> None:
    key = "kserve/Metadata_ZZ.tar.gz"
    put_s3(key, city_artifact("Metadata_ZZ"))
    client = _client(s3_gateway)
    assert not client.is_model_ready(key)
    meta = client.get_model_metadata(key)
    assert meta["name"] == key
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 6]}]
    assert meta["outputs"][0]["name"] == "price"
    assert client.is_model_ready(key)
    config = client.get_model_config(key)
    assert config["name"] == key and config["input"][0]["name"] == "features"
    inp = httpclient.InferInput("features", list(HOUSES.shape), "FP32")
    inp.set_data_from_numpy(HOUSES)
    result = client.infer(key, [inp], model_version="1")
    np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Metadata_ZZ", HOUSES).ravel(), rtol=1e-4)
    stats = polled(lambda: client.get_inference_statistics(key),  # Triton counts a request after answering it
                   lambda stats: stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 1)
    assert stats["model_stats"][0]["name"] == key
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 1


def test_repository_index_load_and_unload_map_to_the_gateway(s3_gateway, put_s3) -> None:
    key = "kserve/Repo_ZZ.tar.gz"
    put_s3(key, city_artifact("Repo_ZZ"))
    client = _client(s3_gateway)
    client.load_model(key)
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index[key]["state"] == "READY"
    client.unload_model(key)
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert index[key]["state"] == "UNAVAILABLE"
    assert not client.is_model_ready(key)
    client.unload_model(key)  # already unloaded: done, as Triton answers (and as the gRPC edge does)
    with pytest.raises(InferenceServerException, match="not known"):
        client.unload_model("kserve/Never_Seen_ZZ.tar.gz")
    status, _, _ = http("POST", f"{s3_gateway.url}/v2/repository/models/{key}/load")
    assert status == 200 and client.is_model_ready(key)


def test_unknown_model_metadata_is_404(s3_gateway: GatewayProcess) -> None:
    status, body, _ = http("GET", f"{s3_gateway.url}/v2/models/Nowhere_ZZ.tar.gz")
    assert status == 404 and "Nowhere_ZZ.tar.gz" in json.loads(body)["error"]


def test_aio_client_concurrent_inferences(s3_gateway: GatewayProcess) -> None:
    async def run() -> list[np.ndarray]:
        client = aiohttpclient.InferenceServerClient(url=s3_gateway.url.removeprefix("http://"))
        try:
            async def one() -> np.ndarray:
                inp = aiohttpclient.InferInput("features", list(HOUSES.shape), "FP32")
                inp.set_data_from_numpy(HOUSES, binary_data=True)
                return (await client.infer("Seattle_WA.tar.gz", [inp])).as_numpy("price")
            return await asyncio.gather(*(one() for _ in range(20)))
        finally:
            await client.close()

    expected = predict("Seattle_WA", HOUSES)
    for answer in asyncio.run(run()):
        np.testing.assert_allclose(answer, expected, rtol=1e-4)


def test_perf_analyzer_over_http_on_a_cold_model(s3_gateway, put_s3, tmp_path) -> None:
    key = "perf/PerfHttp_ZZ.tar.gz"
    put_s3(key, city_artifact("PerfHttp_ZZ"))
    out = tmp_path / "perf.csv"
    proc = subprocess.run(
        [str(PERF_ANALYZER), "-m", key, "-i", "http", "-u", s3_gateway.url.removeprefix("http://"),
         "--shape", "features:1,6", "-p", "500", "-s", "1000", "-r", "10", "--concurrency-range", "1:2:1",
         "-f", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert sorted(int(r["Concurrency"]) for r in rows) == [1, 2]
    assert all(float(r["Inferences/Second"]) > 0 for r in rows)
