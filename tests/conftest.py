"""Session-scoped real parts: moto's S3 server over HTTP, and gateways running real tritonserver processes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import boto3
import pytest

from gateway.demo import DEMO_CITIES
from gateway.triton.process import free_port
from tests.helpers import GatewayProcess, city_artifact

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
BUCKET = "mme-models"
PREFIX = "cities"
SEED_CITIES = DEMO_CITIES[:4]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a loopback port: the gateway talks real S3 over HTTP to it."""
    from moto.server import ThreadedMotoServer

    os.environ.update(S3_ENV)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3(s3_endpoint: str):  # type: ignore[no-untyped-def]
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    for city in SEED_CITIES:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{city}.tar.gz", Body=city_artifact(city))
    return client


@pytest.fixture(scope="session")
def container_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The s3_gateway's --container-api-root: the only place its container API loads models from."""
    return tmp_path_factory.mktemp("container-root")


@pytest.fixture
def model_root(container_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory under the container-API root, for one test's model directories."""
    path = container_root / request.node.name
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def s3_gateway(s3, s3_endpoint: str, container_root: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway on the S3 store with its own embedded Triton, its container API on."""
    work = tmp_path_factory.mktemp("s3-gateway")
    gw = GatewayProcess(
        ["--store", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint-url", s3_endpoint, "--etag-ttl", "1",
         "--container-api", "--container-api-root", str(container_root)],
        work, env=S3_ENV,
    )
    try:
        yield gw.wait_ready()
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def triton_ports() -> dict[str, int]:
    return {"http": free_port(), "grpc": free_port(), "metrics": free_port()}


@pytest.fixture
def put_s3(s3):  # type: ignore[no-untyped-def]
    def put(key: str, body: bytes) -> None:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=body)
    return put


@pytest.fixture(scope="session")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local-store")
    for city in SEED_CITIES:
        (root / f"{city}.tar.gz").write_bytes(city_artifact(city))
    return root


@pytest.fixture(scope="session", autouse=True)
def _quiet_moto() -> None:
    """moto's server logs every S3 request through werkzeug; keep test output about the gateway."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
