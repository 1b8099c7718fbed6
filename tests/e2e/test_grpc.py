"""KServe v2 over gRPC through the gateway, with tritonclient (sync, aio, streaming) and perf_analyzer.

Every model here lives under `grpc/` in the store so that loads and unloads in these tests never disturb
the load/download counts the HTTP tests assert on the shared session gateway.
"""

from __future__ import annotations

import asyncio
import queue
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gateway.demo import predict
from tests.conftest import BUCKET, PREFIX
from tests.helpers import GatewayProcess, city_artifact, polled

HOUSES = np.array([[1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0], [2005.0, 1800.0, 3.0, 2.0, 0.3, 1.0]], dtype=np.float32)
CITIES = {"grpc/Miami_FL.tar.gz": "Miami_FL", "grpc/Denver_CO.tar.gz": "Denver_CO",
          "grpc/Boston_MA.tar.gz": "Boston_MA", "grpc/Atlanta_GA.tar.gz": "Atlanta_GA",
          "grpc/perf/Phoenix_AZ.tar.gz": "Phoenix_AZ"}
PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"


@pytest.fixture(scope="module")
def models(s3) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Upload once per module: a gzip re-made later would carry a new mtime, hence a new ETag and a reload."""
    for key, city in CITIES.items():
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=city_artifact(city))
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/grpc/corrupt.tar.gz", Body=b"\x1f\x8b\x08\x00not a gzip stream")
    return CITIES


@pytest.fixture
def client(s3_gateway: GatewayProcess, models: dict[str, str]) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(url=s3_gateway.grpc_url)
    yield c
    c.close()


def features(houses: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("features", list(houses.shape), "FP32")
    inp.set_data_from_numpy(houses)
    return [inp]


def assert_prices(result: grpcclient.InferResult, city: str, houses: np.ndarray) -> None:
    np.testing.assert_allclose(result.as_numpy("price").ravel(), predict(city, houses).ravel(), rtol=1e-4)


def index(client: grpcclient.InferenceServerClient) -> dict[str, str]:
    return {m.name: m.state for m in client.get_model_repository_index().models}


def ready_models(gw: GatewayProcess) -> set[str]:
    """RepositoryIndex with `ready: true`, which tritonclient does not expose."""
    with grpc.insecure_channel(gw.grpc_url) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).RepositoryIndex(
            service_pb2.RepositoryIndexRequest(ready=True), timeout=10)
    return {m.name for m in answer.models}


def loads(gw: GatewayProcess, key: str) -> int:
    return len([e for e in gw.events("model.loaded") if e["model"] == key])


def refused(call, *args) -> InferenceServerException:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call(*args)
    return info.value


def test_server_live_ready_and_metadata_answer(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "triton" and re.match(r"\d+\.\d+", meta.version)
    assert "model_repository" in meta.extensions and "system_shared_memory" not in meta.extensions


def test_metadata_and_config_load_a_cold_model_under_its_target_model_name(client, s3_gateway) -> None:
    key = "grpc/Miami_FL.tar.gz"
    assert not client.is_model_ready(key)
    meta = client.get_model_metadata(key)
    assert meta.name == key
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("features", "FP32", [-1, 6])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("price", "FP32")]
    config = client.get_model_config(key).config
    assert config.name == key and [o.name for o in config.output] == ["price"]
    assert client.is_model_ready(key)
    assert loads(s3_gateway, key) == 1  # the metadata call loaded it; the config call found it ready


def test_infer_gives_the_model_s_numbers_and_counts_in_statistics(client, s3_gateway) -> None:
    key = "grpc/Miami_FL.tar.gz"
    ok_before = s3_gateway.metric("mme_requests_total", {"protocol": "kserve_grpc", "status": "200"})
    result = client.infer(key, features(HOUSES), outputs=[grpcclient.InferRequestedOutput("price")],
                          request_id="r-1")
    assert_prices(result, "Miami_FL", HOUSES)
    response = result.get_response()
    assert response.model_name == key and response.id == "r-1"
    stats = polled(lambda: client.get_inference_statistics(key).model_stats,  # Triton counts after answering
                   lambda stats: stats[0].inference_stats.success.count >= 1)
    assert [s.name for s in stats] == [key]
    assert stats[0].inference_stats.success.count >= 1 and stats[0].execution_count >= 1
    everything = {s.name for s in client.get_inference_statistics().model_stats}
    assert key in everything and everything <= set(index(client))  # TargetModels only, no Triton names
    assert s3_gateway.metric("mme_requests_total", {"protocol": "kserve_grpc", "status": "200"}) == ok_before + 1


def test_repository_unload_then_index_and_a_later_infer_reloads(client, s3_gateway) -> None:
    key = "grpc/Denver_CO.tar.gz"
    client.load_model(key)
    assert index(client)[key] == "READY" and client.is_model_ready(key) and key in ready_models(s3_gateway)
    client.unload_model(key)
    assert index(client)[key] == "UNAVAILABLE" and not client.is_model_ready(key)
    assert key not in ready_models(s3_gateway)
    assert [e["reason"] for e in s3_gateway.events("model.unloaded") if e["model"] == key] == ["api"]
    assert_prices(client.infer(key, features(HOUSES)), "Denver_CO", HOUSES)
    assert index(client)[key] == "READY" and loads(s3_gateway, key) == 2


def test_unknown_model_is_not_found_and_names_it(client, s3_gateway) -> None:
    key = "grpc/Atlantis_XX.tar.gz"
    before = s3_gateway.metric("mme_requests_total", {"protocol": "kserve_grpc", "status": "404"})
    for error in (refused(client.infer, key, features(HOUSES)), refused(client.get_model_metadata, key),
                  refused(client.unload_model, key)):
        assert error.status() == "StatusCode.NOT_FOUND" and key in error.message()
    assert s3_gateway.metric("mme_requests_total", {"protocol": "kserve_grpc", "status": "404"}) == before + 1
    assert not client.is_model_ready(key)


@pytest.mark.parametrize("key", ["../x.tar.gz", "/etc/passwd", "a//b.tar.gz", ""])
def test_keys_that_escape_the_prefix_are_invalid_arguments(client, key: str) -> None:
    for error in (refused(client.infer, key, features(HOUSES)), refused(client.get_model_config, key)):
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "TargetModel" in error.message()


def test_an_unusable_artifact_is_a_failed_precondition_with_the_reason(client) -> None:
    error = refused(client.infer, "grpc/corrupt.tar.gz", features(HOUSES))
    assert error.status() == "StatusCode.FAILED_PRECONDITION"
    assert "grpc/corrupt.tar.gz" in error.message() and "not a readable .tar.gz" in error.message()


def test_triton_errors_come_back_with_the_target_model_name(client) -> None:
    key = "grpc/Miami_FL.tar.gz"
    wrong = grpcclient.InferInput("nonsense", [1, 6], "FP32")
    wrong.set_data_from_numpy(HOUSES[:1])
    error = refused(client.infer, key, [wrong])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert key in error.message() and "nonsense" in error.message()


def test_shared_memory_is_refused_as_unimplemented(client) -> None:
    error = refused(client.get_system_shared_memory_status)
    assert error.status() == "StatusCode.UNIMPLEMENTED" and "shared memory" in error.message()


def test_aio_concurrent_infers_on_a_cold_model_all_answer_correctly(s3_gateway, models) -> None:
    key = "grpc/Boston_MA.tar.gz"
    rng = np.random.default_rng(7)
    batches = [np.column_stack([rng.integers(1950, 2021, 3), rng.integers(800, 4500, 3), rng.integers(1, 7, (3, 4))])
               .astype(np.float32) for _ in range(20)]

    async def run() -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(url=s3_gateway.grpc_url)
        try:
            async def one(houses: np.ndarray) -> np.ndarray:
                inp = aioclient.InferInput("features", list(houses.shape), "FP32")
                inp.set_data_from_numpy(houses)
                result = await client.infer(key, [inp])
                assert result.get_response().model_name == key
                return result.as_numpy("price")
            return await asyncio.gather(*(one(b) for b in batches))
        finally:
            await client.close()

    for houses, got in zip(batches, asyncio.run(run())):
        np.testing.assert_allclose(got.ravel(), predict("Boston_MA", houses).ravel(), rtol=1e-4)
    assert loads(s3_gateway, key) == 1  # twenty cold callers, one load


def test_stream_infer_forwards_and_reports_refused_requests_in_the_stream(client) -> None:
    key, unknown = "grpc/Atlanta_GA.tar.gz", "grpc/Nowhere_XX.tar.gz"
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)), stream_timeout=60)
    try:
        client.async_stream_infer(key, features(HOUSES), request_id="a")
        client.async_stream_infer(unknown, features(HOUSES), request_id="b")
        client.async_stream_infer(key, features(HOUSES[:1]), request_id="c")
        got = [answers.get(timeout=60) for _ in range(3)]
    finally:
        client.stop_stream()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(results) == ["a", "c"] and all(r.get_response().model_name == key for r in results.values())
    assert_prices(results["a"], "Atlanta_GA", HOUSES)
    assert_prices(results["c"], "Atlanta_GA", HOUSES[:1])
    assert len(errors) == 1 and unknown in errors[0].message()
    client.unload_model(key, client_timeout=5)  # the closed stream let go of its lease: the unload goes through
    assert index(client)[key] == "UNAVAILABLE"


def test_requests_are_read_on_the_wire_as_any_protobuf_parser_would(s3_gateway, models) -> None:
    """Hand-made bytes, not tritonclient's: fields in another order, the name twice (the last one counts), an
    unknown field (forwarded), and malformed messages (INVALID_ARGUMENT, counted as 400), unary and streamed."""
    key = "grpc/Denver_CO.tar.gz"
    tensor = HOUSES.tobytes()
    inputs = service_pb2.ModelInferRequest()
    inputs.inputs.add(name="features", datatype="FP32", shape=list(HOUSES.shape))
    raw_field = service_pb2.ModelInferRequest(raw_input_contents=[tensor]).SerializeToString()
    last = service_pb2.ModelInferRequest(model_name=key, id="r").SerializeToString()
    reordered = (raw_field + service_pb2.ModelInferRequest(model_name="grpc/not-this-one.tar.gz").SerializeToString()
                 + b"\xa2\x06\x03abc"  # field 100: unknown to Triton too, which ignores it
                 + inputs.SerializeToString() + last)
    malformed = b"\x0a\x05ab"  # a name longer than the message
    bad_before = s3_gateway.metric("mme_requests_total", {"protocol": "kserve_grpc", "status": "400"})
    with grpc.insecure_channel(s3_gateway.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        answer = service_pb2.ModelInferResponse.FromString(infer(reordered, timeout=60))
        assert answer.model_name == key and answer.id == "r"
        prices = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32)
        np.testing.assert_allclose(prices, predict("Denver_CO", HOUSES).ravel(), rtol=1e-4)
        with pytest.raises(grpc.RpcError) as error:
            infer(malformed, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith("malformed ModelInferRequest: ")

        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        answers = [service_pb2.ModelStreamInferResponse.FromString(a)
                   for a in stream(iter([malformed, reordered]), timeout=60)]
    assert answers[0].error_message.startswith("malformed ModelInferRequest: ")
    assert answers[1].error_message == "" and answers[1].infer_response.model_name == key
    assert answers[1].infer_response.id == "r"
    assert s3_gateway.metric("mme_requests_total", {"protocol": "kserve_grpc", "status": "400"}) == bad_before + 2


@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="perf_analyzer not installed (make perf-analyzer)")
def test_perf_analyzer_over_grpc_measures_a_cold_model(s3_gateway, models) -> None:
    key = "grpc/perf/Phoenix_AZ.tar.gz"
    run = subprocess.run(
        [str(PERF_ANALYZER), "-m", key, "-i", "grpc", "-u", s3_gateway.grpc_url, "--shape", "features:1,6",
         "-p", "500", "-s", "100", "-r", "5", "--concurrency-range", "1:2:1"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    throughput = {int(c): float(t) for c, t in
                  re.findall(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec", run.stdout)}
    assert sorted(throughput) == [1, 2] and all(t > 0 for t in throughput.values()), run.stdout[-3000:]
