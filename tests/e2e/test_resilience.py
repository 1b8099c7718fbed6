"""A failing dependency never takes the endpoint with it: the store going away, Triton dying under load,
models whose load hangs, stubs that die or hang in `execute`, SIGTERM with gRPC calls in flight.

Each test has its own gateway (and, for the store outage, its own moto server), so what it breaks on
purpose breaks nothing else.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from tests.conftest import S3_ENV
from tests.helpers import (
    GatewayProcess,
    MotoServer,
    ballast_artifact,
    city_artifact,
    descendants,
    http,
    tar_gz,
    v2_request,
)

HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]


def infer_status(gw: GatewayProcess, key: str, timeout: float = 60.0) -> tuple[int, bytes]:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request([HOUSE]), timeout=timeout)
    return status, body


# -- the store goes away ------------------------------------------------------------------------------------


@pytest.fixture
def outage_store(tmp_path: Path) -> Iterator[tuple[MotoServer, GatewayProcess]]:
    os.environ.update(S3_ENV)
    moto = MotoServer().start()
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    s3.create_bucket(Bucket="outage")
    for city in ("Houston_TX", "Boston_MA", "Denver_CO"):
        s3.put_object(Bucket="outage", Key=f"{city}.tar.gz", Body=city_artifact(city))
    gw = GatewayProcess(["--store", "s3://outage/", "--s3-endpoint-url", moto.url, "--etag-ttl", "1"],
                        tmp_path / "gw", env=S3_ENV)
    try:
        yield moto, gw.wait_ready()
    finally:
        gw.stop()
        moto.stop()


def test_models_the_gateway_has_keep_answering_while_the_store_is_down(outage_store) -> None:  # type: ignore[no-untyped-def]
    moto, gw = outage_store
    for key in ("Houston_TX.tar.gz", "Boston_MA.tar.gz"):
        assert infer_status(gw, key)[0] == 200
    assert http("POST", f"{gw.url}/v2/repository/models/Boston_MA.tar.gz/unload")[0] == 200  # staged, not loaded
    moto.stop()
    statuses: Counter[int] = Counter()
    deadline = time.monotonic() + 5  # five ETag TTLs with the store gone
    while time.monotonic() < deadline:
        statuses[infer_status(gw, "Houston_TX.tar.gz", timeout=30)[0]] += 1
        time.sleep(0.05)
    assert set(statuses) == {200}, statuses
    status, body = infer_status(gw, "Boston_MA.tar.gz", timeout=30)  # loaded again from the disk copy
    assert status == 200, body
    status, body = infer_status(gw, "Denver_CO.tar.gz", timeout=60)  # never fetched: nothing to serve
    assert status == 502 and b"Denver_CO.tar.gz" in body
    assert gw.metric("mme_store_unreachable_served_staged_total") >= 1
    moto.start()  # back (moto keeps its objects in the process): the next check finds the store again
    time.sleep(1.5)
    assert infer_status(gw, "Denver_CO.tar.gz")[0] == 200


# -- Triton dies under load ----------------------------------------------------------------------------------


@pytest.fixture
def local_gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    store = tmp_path / "store"
    store.mkdir()
    for city in ("Houston_TX", "Boston_MA"):
        (store / f"{city}.tar.gz").write_bytes(city_artifact(city))
    gw = GatewayProcess(["--store", str(store)], tmp_path / "gw")
    try:
        yield gw.wait_ready()
    finally:
        gw.stop()


def test_no_known_model_is_ever_a_404_while_triton_restarts(local_gateway: GatewayProcess) -> None:
    gw = local_gateway
    keys = ["Houston_TX.tar.gz", "Boston_MA.tar.gz"]
    for key in keys:
        assert infer_status(gw, key)[0] == 200
    statuses: Counter[int] = Counter()
    stop = threading.Event()

    def client(key: str) -> None:
        while not stop.is_set():
            statuses[infer_status(gw, key, timeout=60)[0]] += 1

    threads = [threading.Thread(target=client, args=(key,)) for key in keys * 2]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    (triton,) = descendants(gw.proc.pid, b"tritonserver")
    os.kill(triton, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while gw.metric("mme_triton_restarts_total") < 1 or http("GET", f"{gw.url}/v2/health/ready")[0] != 200:
        assert time.monotonic() < deadline, "Triton did not come back"
        time.sleep(0.2)
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert statuses[404] == 0 and statuses[400] == 0, statuses
    assert set(statuses) <= {200, 503}, statuses
    for key in keys:
        assert infer_status(gw, key)[0] == 200


# -- models that hang or die ------------------------------------------------------------------------------

_CONFIG = ('backend: "python"\nmax_batch_size: 0\ninput [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n'
           'output [{ name: "total" data_type: TYPE_FP32 dims: [-1, 1] }]\n'
           'instance_group [{ kind: KIND_CPU count: 1 }]\n')

# `mode` in initialize: "hang" sleeps for an hour. In execute, once per marker file: "exit" kills the stub,
# "hang" sleeps for an hour; with the marker present it answers (so a fresh stub serves).
_TROUBLE = '''
import os, time
import numpy as np
import triton_python_backend_utils as pb

MODE, WHEN, MARKER = %r, %r, %r


class TritonPythonModel:
    def initialize(self, args):
        if WHEN == "initialize" and MODE == "hang":
            time.sleep(3600)

    def execute(self, requests):
        if WHEN == "execute" and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            if MODE == "exit":
                os._exit(1)
            time.sleep(3600)
        out = []
        for request in requests:
            x = pb.get_input_tensor_by_name(request, "features").as_numpy()
            out.append(pb.InferenceResponse([pb.Tensor("total", x.sum(axis=1, keepdims=True).astype(np.float32))]))
        return out
'''


def trouble_artifact(mode: str, when: str, marker: Path | str = "") -> bytes:
    return tar_gz({"config.pbtxt": _CONFIG.encode(), "1/model.py": (_TROUBLE % (mode, when, str(marker))).encode()})


@pytest.fixture
def trouble(tmp_path: Path) -> Iterator[tuple[Path, GatewayProcess]]:
    store = tmp_path / "store"
    store.mkdir()
    (store / "Good.tar.gz").write_bytes(city_artifact("Houston_TX"))
    gw = GatewayProcess(["--store", str(store), "--load-timeout", "3", "--load-failure-backoff", "600",
                         "--infer-timeout", "3", "--etag-ttl", "0"], tmp_path / "gw")
    try:
        yield store, gw.wait_ready()
    finally:
        gw.stop()


def stubs_of(gw: GatewayProcess, key: str) -> list[int]:
    name = key.removesuffix(".tar.gz")
    return [pid for pid in descendants(gw.proc.pid, b"triton_python_backend_stub")
            if f"/repo/{name}-".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()]


def test_a_load_that_hangs_ends_in_a_clear_failure_and_a_fixed_artifact_then_loads(trouble) -> None:  # type: ignore[no-untyped-def]
    store, gw = trouble
    (store / "Hangs.tar.gz").write_bytes(trouble_artifact("hang", "initialize"))
    started = time.monotonic()
    status, body = infer_status(gw, "Hangs.tar.gz")
    assert status == 422 and b"Hangs.tar.gz" in body and b"load timeout" in body, body
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while stubs_of(gw, "Hangs.tar.gz"):  # its stub was killed, not left hanging
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status, body = infer_status(gw, "Hangs.tar.gz")  # the same bytes: refused at once during the back-off
    assert status == 422 and time.monotonic() - started < 30
    assert http("GET", f"{gw.url}/v2/health/ready")[0] == 200
    (store / "Hangs.tar.gz").write_bytes(city_artifact("Boston_MA"))  # fixed: a new version is tried at once
    status, body = infer_status(gw, "Hangs.tar.gz")
    assert status == 200, body


def test_four_hung_loads_do_not_block_other_models(trouble) -> None:  # type: ignore[no-untyped-def]
    store, gw = trouble
    hung = [f"Hang{i}.tar.gz" for i in range(4)]
    for key in hung:
        (store / key).write_bytes(trouble_artifact("hang", "initialize"))
    results: dict[str, int] = {}

    def call(key: str) -> None:
        results[key] = infer_status(gw, key, timeout=120)[0]

    threads = [threading.Thread(target=call, args=(key,)) for key in hung]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, body = infer_status(gw, "Good.tar.gz", timeout=120)
    waited = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=120)
    assert status == 200, body
    assert waited < 25, f"the good model waited {waited:.1f}s behind hung loads"
    assert results == {key: 422 for key in hung}


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_stub_that_dies_or_hangs_in_execute_costs_only_the_requests_in_flight(trouble, tmp_path: Path,
                                                                                mode: str) -> None:  # type: ignore[no-untyped-def]
    store, gw = trouble
    key = f"Trouble_{mode}.tar.gz"
    (store / key).write_bytes(trouble_artifact(mode, "execute", tmp_path / f"{mode}.marker"))
    outcomes: list[int] = []

    def call() -> None:
        outcomes.append(infer_status(gw, key, timeout=60)[0])

    threads = [threading.Thread(target=call) for _ in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(outcomes) == 3 and time.monotonic() - started < 30, outcomes  # nothing waits 300 s
    assert set(outcomes) <= {200, 503, 504}, outcomes
    deadline = time.monotonic() + 30
    while (status := infer_status(gw, key)[0]) != 200:  # a fresh stub serves within seconds
        assert status in (503, 504) and time.monotonic() < deadline, status
        time.sleep(0.2)
    assert http("POST", f"{gw.url}/v2/repository/models/{key}/unload", timeout=30)[0] == 200
    assert gw.metric("mme_model_unhealthy_total", {"reason": "timeout"}) + gw.metric(
        "mme_model_unhealthy_total", {"reason": "stub_died"}) >= 1


def test_a_stub_killed_from_outside_is_replaced(trouble) -> None:  # type: ignore[no-untyped-def]
    store, gw = trouble
    assert infer_status(gw, "Good.tar.gz")[0] == 200
    for pid in stubs_of(gw, "Good.tar.gz"):
        os.kill(pid, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 30
    while True:
        status = infer_status(gw, "Good.tar.gz", timeout=30)[0]
        statuses.append(status)
        if status == 200:
            break
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)
    assert statuses.count(200) == 1 and len(statuses) <= 5, statuses


def test_grpc_calls_in_flight_at_sigterm_complete(tmp_path: Path) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    store = tmp_path / "store"
    store.mkdir()
    (store / "Slow.tar.gz").write_bytes(ballast_artifact(sleep_s=3))
    gw = GatewayProcess(["--store", str(store)], tmp_path / "gw").wait_ready()
    try:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        tensor = grpcclient.InferInput("features", [1, 6], "FP32")
        tensor.set_data_from_numpy(np.array([HOUSE], dtype=np.float32))
        assert client.infer("Slow.tar.gz", [tensor]).as_numpy("total") is not None  # loaded
        answers: list[object] = []
        thread = threading.Thread(target=lambda: answers.append(_try(lambda: client.infer("Slow.tar.gz", [tensor]))))
        thread.start()
        time.sleep(1.0)
        gw.proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert len(answers) == 1 and not isinstance(answers[0], Exception), answers
        gw.proc.wait(timeout=60)  # uvicorn exits by re-raising the SIGTERM it handled
        assert gw.events("grpc.draining") and gw.events("grpc.stopped")
    finally:
        gw.stop()


def _try(call):  # type: ignore[no-untyped-def]
    try:
        return call()
    except Exception as exc:  # the test reports what it was
        return exc


# -- the local disk fills up --------------------------------------------------------------------------------


def test_a_full_disk_is_a_transient_507_that_is_not_remembered_once_space_is_back(tmp_path: Path) -> None:
    import subprocess

    disk = tmp_path / "nvme"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs as the cache disk needs root")
    store = tmp_path / "store"
    store.mkdir()
    from gateway.demo import onnx_model

    big = tar_gz({"model.onnx": onnx_model("Big_ZZ").SerializeToString(), "weights.pad": bytes(40 << 20)})
    assert len(big) < 1 << 20  # small to download, 40 MiB on disk: room must come from the headers
    (store / "Big.tar.gz").write_bytes(big)
    filler = disk / "filler"
    gw = None
    try:
        gw = GatewayProcess(["--store", str(store), "--cache-dir", str(disk / "cache")], tmp_path / "gw")
        gw.wait_ready()
        filler.write_bytes(bytes(30 << 20))  # another tenant of the disk leaves about 30 MiB free
        status, body = infer_status(gw, "Big.tar.gz")
        assert status == 507 and b"Big.tar.gz" in body and b"local disk" in body, body
        assert not list((disk / "cache" / "tmp").iterdir())  # nothing half-extracted left behind
        filler.unlink()  # space is back: the same version is tried again, not refused from memory
        status, body = infer_status(gw, "Big.tar.gz")
        assert status == 200, body
    finally:
        if gw is not None:
            gw.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)
