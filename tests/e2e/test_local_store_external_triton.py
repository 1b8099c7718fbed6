"""A local-directory store, with the gateway driving an existing Triton (`--triton-*-url`) that shares the
model repository directory, as in the compose deployment."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from gateway.config import default
from gateway.demo import predict, write_artifact
from gateway.triton.control import TritonControl
from gateway.triton.process import TritonProcess, TritonProcessConfig
from tests.helpers import GatewayProcess, http, v2_request

HOUSE = [1990.0, 3047.0, 5.0, 1.0, 1.11, 2.0]


@pytest.fixture(scope="module")
def external_gateway(local_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    work = tmp_path_factory.mktemp("external")
    triton = TritonProcess(TritonProcessConfig(model_repository=work / "cache" / "repo", work_dir=work / "triton"))
    triton.start()
    control = TritonControl(triton.grpc_url, load_timeout_s=default("load_timeout_s"))

    async def ready() -> None:
        await triton.wait_ready(control.is_ready)
        await control.close()

    asyncio.run(ready())
    key_file = work / "triton-api-key"
    key_file.write_text(triton.api_key)  # the secret its restricted APIs expect, as compose hands it over
    gw = GatewayProcess(
        ["--store", str(local_store), "--triton-http-url", triton.http_url, "--triton-grpc-url", triton.grpc_url,
         "--triton-api-key-file", str(key_file), "--onnx-backend", "python", "--etag-ttl", "0"],
        work,
    )
    try:
        yield gw.wait_ready()
    finally:
        gw.stop()
        triton.stop()


def _infer(gw: GatewayProcess, key: str) -> tuple[int, dict]:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request([HOUSE]))
    return status, json.loads(body)


def test_cold_then_warm_from_a_local_directory(external_gateway: GatewayProcess) -> None:
    status, answer = _infer(external_gateway, "Houston_TX.tar.gz")
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], predict("Houston_TX", np.array([HOUSE])).ravel(),
                               rtol=1e-4)
    assert _infer(external_gateway, "Houston_TX.tar.gz")[0] == 200
    assert len([e for e in external_gateway.events("model.loaded") if e["model"] == "Houston_TX.tar.gz"]) == 1


def test_copying_a_file_into_the_directory_adds_a_model(external_gateway, local_store: Path, tmp_path) -> None:
    assert _infer(external_gateway, "Dallas_TX.tar.gz")[0] == 404
    staged = write_artifact("Dallas_TX", tmp_path / "Dallas_TX.tar.gz")
    shutil.copyfile(staged, local_store / "Dallas_TX.tar.gz")
    status, answer = _infer(external_gateway, "Dallas_TX.tar.gz")
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], predict("Dallas_TX", np.array([HOUSE])).ravel(),
                               rtol=1e-4)


def test_replacing_a_file_serves_the_new_version(external_gateway, local_store: Path, tmp_path) -> None:
    key = "Seattle_WA.tar.gz"
    write_artifact("Seattle_WA", local_store / key)
    status, first = _infer(external_gateway, key)
    assert status == 200
    write_artifact("Seattle_WA-2027", local_store / key)  # same key, new bytes: a new ETag (etag TTL is 0 here)
    expected = predict("Seattle_WA-2027", np.array([HOUSE])).ravel()
    deadline = time.monotonic() + 30
    while True:  # checked beside the requests: the loaded version answers until the new one is in
        status, second = _infer(external_gateway, key)
        assert status == 200, second
        if np.allclose(second["outputs"][0]["data"], expected, rtol=1e-4):
            break
        assert time.monotonic() < deadline, "the new version was never served"
        time.sleep(0.1)
    assert second["outputs"][0]["data"] != first["outputs"][0]["data"]
