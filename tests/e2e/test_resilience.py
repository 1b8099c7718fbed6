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

from gateway.triton.process import free_port
from tests.conftest import S3_ENV
from tests.helpers import GatewayProcess, city_artifact, http, v2_request

HOUSE = [1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0]


def infer_status(gw: GatewayProcess, key: str, timeout: float = 60.0) -> tuple[int, bytes]:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request([HOUSE]), timeout=timeout)
    return status, body


def children(pid: int, name: bytes) -> list[int]:
    """Processes under `pid` (any depth) whose command line contains `name`."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = []
    for child in parents:
        ancestor = parents.get(child)
        while ancestor and ancestor != pid:
            ancestor = parents.get(ancestor)
        if ancestor == pid:
            try:
                if name in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
            except OSError:
                pass
    return found


# -- the store goes away ------------------------------------------------------------------------------------


class Moto:
    """A moto S3 server of this test's own, which the test can stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


@pytest.fixture
def outage_store(tmp_path: Path) -> Iterator[tuple[Moto, GatewayProcess]]:
    os.environ.update(S3_ENV)
    moto = Moto()
    moto.start()
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
    (triton,) = children(gw.proc.pid, b"tritonserver")
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
