"""The model cache against a real Triton on the CPU, measured with the host probe, with budgets small enough
to force eviction (each demo model's stub process measures about 80 MB of RSS)."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from gateway.demo import predict
from gateway.memory import HostProbe, descendant_pids
from tests.conftest import BUCKET, PREFIX, S3_ENV
from tests.helpers import GatewayProcess, city_artifact, http, run_for, tar_gz, v2_request

HOUSE = [2001.0, 2500.0, 4.0, 2.0, 0.5, 2.0]
MEMORY_BUDGET = 300_000_000  # room for about three models
CACHE_CITIES = [f"Cache{i:02d}_ZZ" for i in range(10)]


def _gateway(s3_endpoint: str, work: Path, *extra: str) -> GatewayProcess:
    return GatewayProcess(["--store", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint-url", s3_endpoint,
                           "--container-api", *extra],  # GET /models shows each model's state and footprint
                          work, env=S3_ENV)


@pytest.fixture(scope="module")
def cache_gateway(s3, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    for city in CACHE_CITIES:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/cache/{city}.tar.gz", Body=city_artifact(city))
    gw = _gateway(s3_endpoint, tmp_path_factory.mktemp("cache-gw"), "--memory-budget-bytes", str(MEMORY_BUDGET),
                  "--etag-ttl", "1")
    try:
        yield gw.wait_ready()
    finally:
        gw.stop()


def infer(gw: GatewayProcess, key: str) -> tuple[int, dict]:
    status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request([HOUSE]))
    return status, json.loads(body)


def models(gw: GatewayProcess) -> dict[str, dict]:
    status, body, _ = http("GET", gw.url + "/models")
    assert status == 200
    return {m["modelName"]: m for m in json.loads(body)["models"]}


def test_fifty_concurrent_first_calls_cause_one_download_and_one_load(cache_gateway, put_s3) -> None:
    key = "burst/Burst_ZZ.tar.gz"
    put_s3(key, city_artifact("Burst_ZZ"))
    downloads = cache_gateway.metric("mme_model_downloads_total")
    loads = cache_gateway.metric("mme_model_loads_total", {"result": "ok"})
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda _: infer(cache_gateway, key), range(50)))
    assert [status for status, _ in results] == [200] * 50
    expected = predict("Burst_ZZ", np.array([HOUSE])).ravel()
    for _, answer in results:
        np.testing.assert_allclose(answer["outputs"][0]["data"], expected, rtol=1e-4)
    assert cache_gateway.metric("mme_model_downloads_total") == downloads + 1
    assert cache_gateway.metric("mme_model_loads_total", {"result": "ok"}) == loads + 1


def _stub_rss(gw: GatewayProcess) -> int:
    """Real RSS of every Python-backend stub under the gateway (what the budget is about on this machine)."""
    probe = HostProbe()
    stubs = []
    for pid in descendant_pids(gw.proc.pid):
        try:
            if b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes():
                stubs.append(pid)
        except OSError:
            continue
    return probe.process_bytes(stubs)


def test_mixed_load_over_ten_models_with_room_for_three(cache_gateway: GatewayProcess) -> None:
    keys = [f"cache/{city}.tar.gz" for city in CACHE_CITIES]
    evictions_before = cache_gateway.metric("mme_model_evictions_total", {"tier": "memory", "reason": "memory_pressure"})
    failures: list[str] = []
    leased_unloads: list[str] = []
    over_budget: list[str] = []
    stop = threading.Event()
    counts = {"requests": 0}

    def client(seed: int) -> None:
        rng = random.Random(seed)
        weights = [1 / (i + 1) for i in range(len(keys))]  # Zipf-like: some models hot, most cold
        while not stop.is_set():
            key = rng.choices(keys, weights)[0]
            status, answer = infer(cache_gateway, key)
            counts["requests"] += 1
            city = key.split("/")[1].removesuffix(".tar.gz")
            if status != 200:
                failures.append(f"{key}: {status} {answer}")
            else:
                got = answer["outputs"][0]["data"]
                if not np.allclose(got, predict(city, np.array([HOUSE])).ravel(), rtol=1e-4):
                    failures.append(f"{key}: wrong answer {got}")

    def watcher() -> None:
        while not stop.is_set():
            listing = models(cache_gateway)
            for name, m in listing.items():
                if m["state"] in ("unloading", "staged") and m["leases"] > 0:
                    leased_unloads.append(f"{name} {m['state']} with {m['leases']} leases")
            resident = sum(m["footprintBytes"] or 0 for m in listing.values()
                           if m["state"] in ("loading", "ready", "unloading"))
            used = cache_gateway.metric("mme_memory_used_bytes")
            rss = _stub_rss(cache_gateway)
            for what, value in (("accounted", resident), ("gauge", used), ("stub RSS", rss)):
                if value > MEMORY_BUDGET:
                    over_budget.append(f"{what} {value} > {MEMORY_BUDGET}")
            time.sleep(0.1)

    run_for(30, stop, [functools.partial(client, i) for i in range(6)] + [watcher])

    assert counts["requests"] >= 10  # a loaded 2-core machine manages a few per second
    assert failures == []
    assert leased_unloads == []
    assert over_budget == []
    assert cache_gateway.metric("mme_model_evictions_total",
                                {"tier": "memory", "reason": "memory_pressure"}) > evictions_before
    loaded = [m for m in models(cache_gateway).values() if m["state"] == "ready"]
    assert len(loaded) < len(keys)  # "about three": how many fit follows the measured footprints
    assert sum(m["footprintBytes"] for m in loaded) <= MEMORY_BUDGET


def test_a_model_evicted_from_memory_reloads_from_disk_without_downloading(cache_gateway) -> None:
    keys = [f"cache/{city}.tar.gz" for city in CACHE_CITIES[:5]]
    for key in keys:  # five models through room for three: the first ones are evicted from memory
        assert infer(cache_gateway, key)[0] == 200
    listing = models(cache_gateway)
    evicted = [k for k in keys if listing[k]["state"] == "staged"]
    assert evicted, listing
    downloads = cache_gateway.metric("mme_model_downloads_total")
    disk_hits = cache_gateway.metric("mme_disk_tier_hits_total")
    assert infer(cache_gateway, evicted[0])[0] == 200
    assert cache_gateway.metric("mme_model_downloads_total") == downloads
    assert cache_gateway.metric("mme_disk_tier_hits_total") == disk_hits + 1


def test_a_replaced_object_is_served_in_its_new_version_after_the_ttl(cache_gateway, put_s3) -> None:
    key = "replace/Replace_ZZ.tar.gz"
    put_s3(key, city_artifact("Replace_ZZ"))
    assert infer(cache_gateway, key)[0] == 200
    put_s3(key, city_artifact("Replace_ZZ-v2"))
    time.sleep(1.2)  # the gateway's ETag TTL is 1 s
    old, new = (predict(city, np.array([HOUSE])).ravel() for city in ("Replace_ZZ", "Replace_ZZ-v2"))
    deadline = time.monotonic() + 30
    while True:  # the version check runs beside the requests, which the loaded version answers meanwhile
        status, answer = infer(cache_gateway, key)
        assert status == 200
        if np.allclose(answer["outputs"][0]["data"], new, rtol=1e-4):
            break
        np.testing.assert_allclose(answer["outputs"][0]["data"], old, rtol=1e-4)
        assert time.monotonic() < deadline, "the new version was never served"
        time.sleep(0.1)


def test_a_model_larger_than_the_budget_gets_507_naming_the_sizes(cache_gateway, put_s3) -> None:
    config = b'backend: "python"\nmax_batch_size: 0\n' \
             b'input [{ name: "x" data_type: TYPE_FP32 dims: [-1] }]\n' \
             b'output [{ name: "y" data_type: TYPE_FP32 dims: [-1] }]\n' \
             b'instance_group [{ kind: KIND_CPU count: 8 }]\n'
    code = b"class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    put_s3("huge.tar.gz", tar_gz({"config.pbtxt": config, "1/model.py": code}))
    status, answer = infer(cache_gateway, "huge.tar.gz")
    assert status == 507, answer
    assert "huge.tar.gz" in answer["error"] and str(MEMORY_BUDGET) in answer["error"]
    assert "bytes" in answer["error"]
    assert http("GET", cache_gateway.url + "/v2/health/ready")[0] == 200
    assert infer(cache_gateway, f"cache/{CACHE_CITIES[0]}.tar.gz")[0] == 200


def test_a_model_evicted_from_disk_downloads_again(s3, s3_endpoint, tmp_path) -> None:
    cities = [f"Disk{i}_ZZ" for i in range(4)]
    for city in cities:
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/disk/{city}.tar.gz", Body=city_artifact(city))
    # Room for two models in memory and about two staged model directories on disk.
    gw = _gateway(s3_endpoint, tmp_path, "--memory-budget-bytes", "200000000", "--disk-budget-bytes", "10000")
    try:
        gw.wait_ready()
        for city in cities:
            assert infer(gw, f"disk/{city}.tar.gz")[0] == 200
        assert gw.metric("mme_model_evictions_total", {"tier": "disk", "reason": "disk_budget"}) >= 1
        first = f"disk/{cities[0]}.tar.gz"
        assert first not in models(gw) or models(gw)[first]["state"] != "ready"
        assert not (gw.cache_dir / "meta").joinpath("x").exists()
        downloads = gw.metric("mme_model_downloads_total")
        assert infer(gw, first)[0] == 200
        assert gw.metric("mme_model_downloads_total") == downloads + 1
        assert gw.metric("mme_disk_used_bytes") <= 10000 * 2  # best effort: loaded models are never deleted
    finally:
        gw.stop()


def test_footprints_learned_before_a_restart_are_used_as_estimates(s3, s3_endpoint, tmp_path) -> None:
    key = "restart/Restart_ZZ.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=city_artifact("Restart_ZZ"))
    gw = _gateway(s3_endpoint, tmp_path)
    try:
        gw.wait_ready()
        assert infer(gw, key)[0] == 200
        first = [e for e in gw.events("model.admitted") if e["model"] == key][0]
        measured = [e for e in gw.events("model.loaded") if e["model"] == key][0]
        assert first["estimate_source"] == "size_x_factor" and measured["footprint_source"] == "measured"
    finally:
        gw.stop()
    again = _gateway(s3_endpoint, tmp_path)
    try:
        again.wait_ready()
        assert infer(again, key)[0] == 200
        admitted = [e for e in again.events("model.admitted") if e["model"] == key]
        assert admitted[-1]["estimate_source"] == "ledger"
        # The ledger keeps the largest footprint seen, in use included (the runner's arena grows on the first
        # request), beside the one measured just after the load.
        [entry] = json.loads((tmp_path / "cache" / "footprints.json").read_text())["footprints"].values()
        assert entry["loaded"] == measured["footprint_bytes"] and entry["bytes"] >= entry["loaded"]
        assert admitted[-1]["need_bytes"] == entry["bytes"]
        assert again.metric("mme_model_downloads_total") == 0  # still on disk: no second download
    finally:
        again.stop()


def test_cache_disabled_unloads_and_deletes_after_each_call(s3, s3_endpoint, tmp_path) -> None:
    key = "nocache/NoCache_ZZ.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=city_artifact("NoCache_ZZ"))
    gw = _gateway(s3_endpoint, tmp_path, "--model-cache", "disabled", "--instance-type", "ml.g5.xlarge")
    try:
        gw.wait_ready()
        assert infer(gw, key)[0] == 200
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and gw.metric("mme_model_evictions_total",
                                                        {"tier": "memory", "reason": "cache_disabled"}) < 1:
            time.sleep(0.1)
        assert gw.metric("mme_model_evictions_total", {"tier": "memory", "reason": "cache_disabled"}) == 1
        assert gw.metric("mme_loaded_models") == 0
        assert list((gw.cache_dir / "repo").iterdir()) == []
        assert infer(gw, key)[0] == 200
        assert gw.metric("mme_model_downloads_total") == 2
        # The profile asks for 24 GiB of GPU memory; this machine has less, so the smaller number wins.
        warned = gw.events("resources.profile_exceeds_machine")
        budget = gw.metric("mme_memory_budget_bytes")
        if warned:
            assert budget < 24 * (1 << 30)
        else:
            assert budget == pytest.approx(0.9 * 24 * (1 << 30), rel=1e-6)
        resolved = gw.events("resources.resolved")[0]
        assert resolved["max_concurrency"] == 4 and resolved["profile"] == "ml.g5.xlarge"
    finally:
        gw.stop()


def test_after_triton_dies_the_gateway_restarts_it_and_reloads_from_disk(s3, s3_endpoint, tmp_path) -> None:
    key = "crash/Crash_ZZ.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=city_artifact("Crash_ZZ"))
    gw = _gateway(s3_endpoint, tmp_path)
    try:
        gw.wait_ready()
        assert infer(gw, key)[0] == 200
        triton = [pid for pid in descendant_pids(gw.proc.pid)
                  if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"tritonserver")]
        assert len(triton) == 1
        os.kill(triton[0], signal.SIGKILL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (
            gw.metric("mme_triton_restarts_total") == 1 and http("GET", gw.url + "/v2/health/ready")[0] == 200
        ):
            time.sleep(0.2)
        assert gw.metric("mme_triton_restarts_total") == 1
        assert models(gw)[key]["state"] == "staged"  # reconciled: Triton lost it, the disk still has it
        status, answer = infer(gw, key)
        assert status == 200, answer
        assert gw.metric("mme_model_downloads_total") == 1
        assert gw.metric("mme_disk_tier_hits_total") == 1
    finally:
        gw.stop()


def test_invocations_beyond_the_concurrency_cap_queue_then_get_429(s3, s3_endpoint, tmp_path) -> None:
    config = b'backend: "python"\nmax_batch_size: 0\n' \
             b'input [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n' \
             b'output [{ name: "total" data_type: TYPE_FP32 dims: [-1, 1] }]\n' \
             b'instance_group [{ kind: KIND_CPU count: 1 }]\n'
    code = (b"import time\nimport triton_python_backend_utils as pb\n"
            b"class TritonPythonModel:\n"
            b"    def execute(self, requests):\n"
            b"        time.sleep(1.0)\n"
            b"        out = []\n"
            b"        for r in requests:\n"
            b"            x = pb.get_input_tensor_by_name(r, 'features').as_numpy()\n"
            b"            out.append(pb.InferenceResponse([pb.Tensor('total', x.sum(axis=1, keepdims=True))]))\n"
            b"        return out\n")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/slow.tar.gz", Body=tar_gz({"config.pbtxt": config, "1/model.py": code}))
    gw = _gateway(s3_endpoint, tmp_path, "--max-concurrency", "1", "--queue-timeout", "0.3")
    try:
        gw.wait_ready()
        assert infer(gw, "slow.tar.gz")[0] == 200  # loaded; each call now takes a second
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(lambda _: infer(gw, "slow.tar.gz"), range(3)))
        statuses = sorted(status for status, _ in results)
        assert statuses[0] == 200 and 429 in statuses, results
        throttled = [answer for status, answer in results if status == 429]
        assert all(a["code"] == "ThrottlingException" and "slow.tar.gz" in a["error"] for a in throttled)
    finally:
        gw.stop()
