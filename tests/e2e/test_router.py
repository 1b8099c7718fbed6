"""The router in front of three real gateways on loopback, each with its own embedded Triton.

Adversarial cases first: no healthy instance, then an instance killed while requests flow (and brought back).
Then what must hold in normal running: every client works through the router unchanged; 200 requests over
10 models load each model on exactly one instance; a hot model gets a second copy and both copies serve;
both routing strategies are selectable and visible in the router's metrics.

The gateways are module-scoped and share one local store of tiny models; models are named per test so the
counts one test asserts are not moved by another.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import boto3
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway.demo import predict
from gateway.triton.process import free_port
from tests.helpers import GatewayProcess, RouterProcess, ballast_artifact, city_artifact, http, v2_request

HOUSES = np.array([[1994.0, 3188.0, 5.0, 1.5, 1.62, 3.0], [2005.0, 1800.0, 3.0, 2.0, 0.3, 1.0]], dtype=np.float32)
PERF_ANALYZER = Path(sys.executable).parent / "perf_analyzer"
SPREAD = [f"spread/City{i:02d}_ZZ.tar.gz" for i in range(10)]
FAILOVER = [f"failover/City{i:02d}_ZZ.tar.gz" for i in range(6)]
RETURN = [f"return/City{i:02d}_ZZ.tar.gz" for i in range(9)]
HOT = "hot/slow.tar.gz"
SPILL_THRESHOLD = 6  # above the concurrency of every test but the hot-model one


def city_of(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".tar.gz")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("router-store")
    for key in ["Houston_TX.tar.gz", "Chicago_IL.tar.gz", *SPREAD, *FAILOVER, *RETURN]:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(city_artifact(city_of(key)))
    (root / HOT).parent.mkdir(parents=True, exist_ok=True)
    (root / HOT).write_bytes(ballast_artifact(sleep_s=0.05))
    return root


@pytest.fixture(scope="module")
def gateways(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[GatewayProcess]]:
    work = tmp_path_factory.mktemp("router-gateways")
    gws = [GatewayProcess(["--store", str(store), "--remeasure-interval", "0"], work / f"gw{i}") for i in range(3)]
    try:
        for gw in gws:
            gw.wait_ready()
        yield gws
    finally:
        for gw in gws:
            gw.stop()


@pytest.fixture(scope="module")
def router(gateways: list[GatewayProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    r = RouterProcess(gateways, tmp_path_factory.mktemp("router"),
                      ["--health-interval", "0.5", "--listing-interval", "1", "--spill-threshold", str(SPILL_THRESHOLD)])
    try:
        yield r.wait_healthy()
    finally:
        r.stop()


def infer(url: str, key: str, rows: np.ndarray = HOUSES[:1], timeout: float = 120) -> tuple[int, bytes]:
    status, body, _ = http("POST", f"{url}/v2/models/{key}/infer", v2_request(rows.tolist()), timeout=timeout)
    return status, body


def price(body: bytes) -> list[float]:
    return json.loads(body)["outputs"][0]["data"]


def held(gw: GatewayProcess) -> set[str]:
    """READY models in the gateway's repository index."""
    status, body, _ = http("POST", gw.url + "/v2/repository/index", b'{"ready": true}')
    assert status == 200, body
    return {row["name"] for row in json.loads(body)}


def loads(gw: GatewayProcess, key: str) -> int:
    return len([e for e in gw.events("model.loaded") if e.get("model") == key])


def decisions(router: RouterProcess, reason: str) -> float:
    return sum(v for labels, v in router.samples("mme_router_routing_decisions_total").items()
               if ("reason", reason) in labels)


def served(gw: GatewayProcess, key: str) -> int:
    """Successful inferences Triton counted for `key` on this gateway (only ask where it is loaded)."""
    status, body, _ = http("GET", f"{gw.url}/v2/models/{key}/stats")
    assert status == 200, body
    return sum(s["inference_stats"]["success"]["count"] for s in json.loads(body)["model_stats"])


# -- no healthy instance -------------------------------------------------------------------------------------


def test_no_healthy_instance_is_a_503_with_the_reason(tmp_path: Path) -> None:
    nobody = GatewayProcess.__new__(GatewayProcess)  # an address where nothing listens
    nobody.port, nobody.grpc_port = free_port(), free_port()
    r = RouterProcess([nobody], tmp_path, ["--health-interval", "0.2", "--max-request-bytes", "4096"])
    try:
        deadline = time.monotonic() + 30
        while not _up(r) and time.monotonic() < deadline:
            time.sleep(0.1)
        status, body, headers = http("POST", f"{r.url}/v2/models/Houston_TX.tar.gz/infer", v2_request(HOUSES.tolist()))
        assert status == 503 and {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
        assert "no healthy gateway instance" in json.loads(body)["error"]
        assert http("GET", r.url + "/v2/health/ready")[0] == 503
        with grpcclient.InferenceServerClient(r.grpc_url) as client:
            with pytest.raises(InferenceServerException) as err:
                client.infer("Houston_TX.tar.gz", grpc_inputs(HOUSES))
            assert "no healthy gateway instance" in err.value.message()
            assert client.is_server_live() and not client.is_server_ready()
        assert r.samples("mme_router_errors_total")[frozenset({("kind", "no_instance")})] >= 2
        # Bodies over the router's cap are refused before any instance is needed.
        big = np.zeros((200, 6), dtype=np.float32)
        status, body, _ = http("POST", f"{r.url}/v2/models/Houston_TX.tar.gz/infer", v2_request(big.tolist()))
        assert status == 413 and json.loads(body)["code"] == "RequestTooLarge"
        with grpcclient.InferenceServerClient(r.grpc_url) as client:
            with pytest.raises(InferenceServerException) as err:
                client.infer("Houston_TX.tar.gz", grpc_inputs(big))
            assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        r.stop()


def _up(r: RouterProcess) -> bool:
    try:
        return http("GET", r.url + "/v2/health/live", timeout=2)[0] == 200
    except OSError:
        return False


def grpc_inputs(houses: np.ndarray) -> list[grpcclient.InferInput]:
    inp = grpcclient.InferInput("features", list(houses.shape), "FP32")
    inp.set_data_from_numpy(houses)
    return [inp]


# -- clients, unchanged ----------------------------------------------------------------------------------------


def test_tritonclient_http_and_grpc_work_through_the_router(router: RouterProcess) -> None:
    http_client = httpclient.InferenceServerClient(router.url.removeprefix("http://"))
    inp = httpclient.InferInput("features", list(HOUSES.shape), "FP32")
    inp.set_data_from_numpy(HOUSES, binary_data=True)
    answer = http_client.infer("Houston_TX.tar.gz", [inp]).as_numpy("price")
    np.testing.assert_allclose(answer.ravel(), predict("Houston_TX", HOUSES).ravel(), rtol=1e-4)
    assert http_client.is_server_ready() and http_client.is_model_ready("Houston_TX.tar.gz")
    assert http_client.get_model_metadata("Houston_TX.tar.gz")["name"] == "Houston_TX.tar.gz"
    with grpcclient.InferenceServerClient(router.grpc_url) as client:
        result = client.infer("Chicago_IL.tar.gz", grpc_inputs(HOUSES))
        np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Chicago_IL", HOUSES).ravel(), rtol=1e-4)
        assert client.get_model_metadata("Chicago_IL.tar.gz").name == "Chicago_IL.tar.gz"
        assert client.is_server_live() and client.is_server_ready()
        with pytest.raises(InferenceServerException) as err:  # the instance's own error comes back as it sent it
            client.infer("missing/Nowhere.tar.gz", grpc_inputs(HOUSES))
        assert err.value.status() == "StatusCode.NOT_FOUND" and "missing/Nowhere.tar.gz" in err.value.message()


def test_grpc_stream_works_through_the_router(router: RouterProcess) -> None:
    import queue

    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(router.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(3):
            client.async_stream_infer("Houston_TX.tar.gz", grpc_inputs(HOUSES), request_id=str(i))
        got = [answers.get(timeout=60) for _ in range(3)]
        client.stop_stream()
    assert all(error is None for _, error in got)
    for result, _ in got:
        np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Houston_TX", HOUSES).ravel(), rtol=1e-4)


def test_boto3_sagemaker_runtime_works_through_the_router(router: RouterProcess) -> None:
    runtime = boto3.client("sagemaker-runtime", endpoint_url=router.url, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
    answer = runtime.invoke_endpoint(EndpointName="houses", TargetModel="Houston_TX.tar.gz", ContentType="text/csv",
                                     Body="1994,3188,5,1.5,1.62,3\n2005,1800,3,2.0,0.3,1")
    prices = [float(line) for line in answer["Body"].read().decode().split()]
    np.testing.assert_allclose(prices, predict("Houston_TX", HOUSES).ravel(), rtol=1e-4)


def test_headers_reach_the_instance_untouched(router: RouterProcess, gateways: list[GatewayProcess]) -> None:
    """Host and Authorization as the client sent them (SigV4 signs Host): the gateway echoes what SageMaker
    expects, and an unknown model's error names it with the gateway's own code."""
    status, body, headers = http("POST", f"{router.url}/invocations", b"1994,3188,5,1.5,1.62,3",
                                 {"X-Amzn-SageMaker-Target-Model": "Houston_TX.tar.gz", "Content-Type": "text/csv",
                                  "Host": "runtime.example:443", "Authorization": "Bearer opaque"})
    assert status == 200 and {k.lower(): v for k, v in headers.items()}.get("x-amzn-invoked-production-variant") == "AllTraffic", body
    status, body, _ = http("POST", f"{router.url}/v2/models/missing/Nowhere.tar.gz/infer", v2_request([[1.0] * 6]))
    assert status == 404 and json.loads(body)["code"] == "ModelNotFound"


@pytest.mark.skipif(not PERF_ANALYZER.exists(), reason="perf_analyzer not installed (make perf-analyzer)")
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_works_through_the_router(router: RouterProcess, protocol: str) -> None:
    url = router.url.removeprefix("http://") if protocol == "http" else router.grpc_url
    run = subprocess.run(
        [str(PERF_ANALYZER), "-m", "Houston_TX.tar.gz", "-i", protocol, "-u", url, "--shape", "features:1,6",
         "-p", "500", "-s", "100", "-r", "5", "--concurrency-range", "2:2"],
        capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Concurrency: 2, throughput:" in run.stdout, run.stdout[-3000:]


def test_instances_found_by_dns(gateways: list[GatewayProcess], tmp_path: Path) -> None:
    """`localhost` stands for a headless Service: every address it resolves to is an instance, and the ones
    that answer health checks take traffic."""
    gw = gateways[0]
    r = RouterProcess([], tmp_path, ["--dns-name", "localhost", "--instance-http-port", str(gw.port),
                                     "--instance-grpc-port", str(gw.grpc_port), "--health-interval", "0.5"])
    try:
        r.wait_healthy(1)
        status, body = infer(r.url, "Houston_TX.tar.gz", HOUSES)
        assert status == 200, body
        np.testing.assert_allclose(price(body), predict("Houston_TX", HOUSES).ravel(), rtol=1e-4)
        assert f'"127.0.0.1:{gw.port}"' in r.log_text()  # router.instance_added, from the resolver's answer
    finally:
        r.stop()


# -- placement ------------------------------------------------------------------------------------------------


def test_200_requests_over_10_models_load_each_model_on_exactly_one_instance(
        router: RouterProcess, gateways: list[GatewayProcess]) -> None:
    rng = random.Random(13)
    trace = [rng.choice(SPREAD) for _ in range(200)]
    loads_before = [gw.metric("mme_model_loads_total", {"result": "ok"}) for gw in gateways]
    failures: list[tuple[str, int]] = []
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        for key in mine:
            status, _ = infer(router.url, key)
            if status != 200:
                with lock:
                    failures.append((key, status))

    threads = [threading.Thread(target=worker, args=(trace[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures
    holders = {key: [i for i, gw in enumerate(gateways) if key in held(gw)] for key in SPREAD}
    assert all(len(h) == 1 for h in holders.values()), holders
    assert all(sum(loads(gw, key) for gw in gateways) == 1 for key in SPREAD)
    loaded = [gw.metric("mme_model_loads_total", {"result": "ok"}) - b for gw, b in zip(gateways, loads_before)]
    assert sum(loaded) == len(SPREAD), loaded  # the instances' own counters: ten loads in all, no second copy
    assert len({h[0] for h in holders.values()}) >= 2, holders  # hashed across the fleet, not piled on one


def test_a_hot_model_gets_a_second_copy_and_both_serve(router: RouterProcess, gateways: list[GatewayProcess]) -> None:
    assert infer(router.url, HOT)[0] == 200  # one copy first
    assert sum(HOT in held(gw) for gw in gateways) == 1
    spills = decisions(router, "spill")
    stop = threading.Event()
    failures: list[int] = []

    def worker() -> None:
        while not stop.is_set():
            status, _ = infer(router.url, HOT)
            if status != 200:
                failures.append(status)

    threads = [threading.Thread(target=worker) for _ in range(SPILL_THRESHOLD * 2)]
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert not failures
    holders = [gw for gw in gateways if HOT in held(gw)]
    assert len(holders) >= 2 and decisions(router, "spill") > spills
    assert all(served(gw, HOT) > 0 for gw in holders)


def test_both_strategies_are_selectable_and_visible(router: RouterProcess, gateways: list[GatewayProcess],
                                                    tmp_path: Path) -> None:
    """With the hot model on two instances and one request at a time, least-outstanding-requests keeps to the
    first holder in hash order (ties), random uses both."""
    holders = [gw for gw in gateways if HOT in held(gw)]
    assert len(holders) >= 2, "runs after the hot-model test"
    other = RouterProcess(gateways, tmp_path, ["--health-interval", "0.5", "--listing-interval", "1",
                                               "--routing-strategy", "random"])
    try:
        other.wait_healthy()
        time.sleep(1.5)  # a listing: the random router learns where the hot model is
        for r in (router, other):
            before = [served(gw, HOT) for gw in holders]
            for _ in range(30):
                assert infer(r.url, HOT)[0] == 200
            counts = [served(gw, HOT) - b for gw, b in zip(holders, before)]
            strategy = "least-outstanding-requests" if r is router else "random"
            assert r.samples("mme_router_routing_strategy")[frozenset({("strategy", strategy)})] == 1
            assert decisions(r, "affinity") > 0
            assert all(("strategy", strategy) in labels for labels in r.samples("mme_router_routing_decisions_total"))
            if r is router:
                assert sorted(counts)[-1] == 30, counts
            else:
                assert sum(c > 0 for c in counts) >= 2, counts
    finally:
        other.stop()


def test_an_unload_through_the_router_reaches_every_copy(router: RouterProcess,
                                                         gateways: list[GatewayProcess]) -> None:
    assert sum(HOT in held(gw) for gw in gateways) >= 2, "runs after the hot-model test"
    status, body, _ = http("POST", f"{router.url}/v2/repository/models/{HOT}/unload", b"{}")
    assert status == 200, body
    assert not any(HOT in held(gw) for gw in gateways)
    with grpcclient.InferenceServerClient(router.grpc_url) as client:
        client.unload_model(SPREAD[0])
        with pytest.raises(InferenceServerException) as err:  # no instance knows it: the gateways' NOT_FOUND
            client.unload_model("missing/Nowhere.tar.gz")
        assert err.value.status() == "StatusCode.NOT_FOUND"
    assert not any(SPREAD[0] in held(gw) for gw in gateways)
    hashed = decisions(router, "hash")
    assert infer(router.url, HOT)[0] == 200  # forgotten everywhere: placed again by its hash
    assert decisions(router, "hash") == hashed + 1


# -- failure and return ----------------------------------------------------------------------------------------


def test_an_instance_killed_while_requests_flow(router: RouterProcess, gateways: list[GatewayProcess]) -> None:
    """Only requests in flight on the killed instance may fail; its models answer from the others; it is
    taken back in when it returns, and takes new models again."""
    for key in FAILOVER:
        assert infer(router.url, key)[0] == 200
    victim = max(gateways, key=lambda gw: len(held(gw) & set(FAILOVER)))
    orphans = held(victim) & set(FAILOVER)
    assert orphans
    workers = 4
    results: list[tuple[float, float, str, bool]] = []  # (start, end, model, ok)
    stop = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        rng = random.Random(n)
        grpc_client = grpcclient.InferenceServerClient(router.grpc_url)
        while not stop.is_set():
            key = rng.choice(FAILOVER)
            started = time.monotonic()
            if n % 2:
                try:
                    grpc_client.infer(key, grpc_inputs(HOUSES[:1]), client_timeout=120)
                    ok = True
                except InferenceServerException:
                    ok = False
            else:
                ok = infer(router.url, key)[0] == 200
            with lock:
                results.append((started, time.monotonic(), key, ok))
        grpc_client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    time.sleep(2)
    victim.kill()
    killed_at = time.monotonic()  # dead by now: requests sent before may have been on it
    time.sleep(10)
    stop.set()
    for t in threads:
        t.join(timeout=180)
    lost = [r for r in results if not r[3]]
    assert all(start < killed_at for start, _, _, _ in lost), lost  # nothing sent after the kill was lost
    assert len(lost) <= workers, lost  # at most the one request each client had in flight
    for key in orphans:
        after = [end for start, end, k, ok in results if k == key and ok and start >= killed_at]
        assert after, f"{key} never answered after its instance died"
    assert router.healthy_count() == 2
    victim_name = f"127.0.0.1:{victim.port}"
    assert any(f'"instance": "{victim_name}"' in line for line in router.log_text().splitlines()
               if '"router.instance_down"' in line)

    victim.restart().wait_ready()
    router.wait_healthy(3, timeout_s=30)
    for key in RETURN:
        assert infer(router.url, key)[0] == 200
    assert held(victim) & set(RETURN), "the returned instance takes no new models"


# -- API keys on the gateways ---------------------------------------------------------------------------------


def create_key(keys_file: Path, name: str, scopes: str) -> str:
    made = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--name", name, "--scopes", scopes,
                           "--file", str(keys_file)], capture_output=True, text=True, timeout=60, check=True)
    return made.stdout.split()[0]


def test_clients_credentials_pass_through_and_the_router_lists_with_its_own_key(store: Path, tmp_path: Path) -> None:
    """A gateway with API keys behind two routers: clients' keys (HTTP header, gRPC metadata) reach it
    untouched, so a missing key is the gateway's 401; the router with a manage key learns placements from
    listings, the one without says why it cannot."""
    keys = tmp_path / "keys.txt"
    ops, app = create_key(keys, "router", "invoke,manage"), create_key(keys, "app", "invoke")
    gw = GatewayProcess(["--store", str(store), "--api-keys-file", str(keys)], tmp_path / "gw")
    routers: list[RouterProcess] = []
    try:
        gw.wait_ready()
        keyed = RouterProcess([gw], tmp_path / "keyed", ["--health-interval", "0.5", "--listing-interval", "0.5",
                                                         "--upstream-api-key", ops])
        anonymous = RouterProcess([gw], tmp_path / "anonymous", ["--health-interval", "0.5", "--listing-interval", "0.5"])
        routers = [keyed, anonymous]
        for r in routers:
            r.wait_healthy()
        key = "Houston_TX.tar.gz"
        status, body, _ = http("POST", f"{keyed.url}/v2/models/{key}/infer", v2_request(HOUSES.tolist()),
                               {"Authorization": f"Bearer {app}"})
        assert status == 200, body
        assert http("POST", f"{keyed.url}/v2/models/{key}/infer", v2_request(HOUSES.tolist()))[0] == 401
        with grpcclient.InferenceServerClient(keyed.grpc_url) as client:
            result = client.infer(key, grpc_inputs(HOUSES), headers={"authorization": f"Bearer {app}"})
            np.testing.assert_allclose(result.as_numpy("price").ravel(), predict("Houston_TX", HOUSES).ravel(),
                                       rtol=1e-4)
            with pytest.raises(InferenceServerException) as err:
                client.infer(key, grpc_inputs(HOUSES))
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        # Each router learns from its own answers; only a listing tells it of the model the other one served.
        status, body, _ = http("POST", f"{anonymous.url}/v2/models/Chicago_IL.tar.gz/infer",
                               v2_request(HOUSES.tolist()), {"Authorization": f"Bearer {app}"})
        assert status == 200, body

        def known(r: RouterProcess) -> float:
            return sum(r.samples("mme_router_instance_models").values())

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (known(keyed) < 2 or "router.listing_refused" not in anonymous.log_text()):
            time.sleep(0.2)
        assert known(keyed) == 2 and "router.listing_refused" not in keyed.log_text()
        assert known(anonymous) == 1 and "router.listing_refused" in anonymous.log_text()
    finally:
        for r in routers:
            r.stop()
        gw.stop()
