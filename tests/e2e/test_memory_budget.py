"""The memory budget holds against a real Triton on the CPU (host probe), with models whose loaded size is
nothing like their artifact: about 1 KB of tar.gz that holds hundreds of MB once `initialize` has run,
models that grow on every request, models that fail to load with a CUDA-style out-of-memory error, many
clients at once."""

from __future__ import annotations

import calendar
import functools
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.memory import HostProbe, stub_pids_by_model
from tests.conftest import BUCKET, PREFIX, S3_ENV
from tests.helpers import GatewayProcess, ballast_artifact, http, run_for, v2_request

MIB = 1 << 20
ROW = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
MEMORY_REASONS = ("memory_pressure", "device_memory", "measured_over_budget", "growth", "out_of_memory")


def _gateway(s3_endpoint: str, work: Path, *extra: str) -> GatewayProcess:
    return GatewayProcess(["--store", f"s3://{BUCKET}/{PREFIX}", "--s3-endpoint-url", s3_endpoint,
                           "--container-api", *extra],  # GET /models shows each model's state and footprint
                          work, env=S3_ENV).wait_ready()


def infer(gw: GatewayProcess, key: str) -> tuple[int, dict, dict[str, str]]:
    """KServe v2 infer: (status, JSON answer, headers with lower-case names)."""
    status, body, headers = http("POST", f"{gw.url}/v2/models/{key}/infer", v2_request([ROW]))
    return status, json.loads(body or b"{}"), {k.lower(): v for k, v in headers.items()}


def invoke(gw: GatewayProcess, key: str) -> tuple[int, dict, dict[str, str]]:
    """The same call through the SageMaker runtime edge."""
    status, body, headers = http("POST", f"{gw.url}/endpoints/mme/invocations", v2_request([ROW]),
                                 {"X-Amzn-SageMaker-Target-Model": key, "Content-Type": "application/json"})
    return status, json.loads(body or b"{}"), {k.lower(): v for k, v in headers.items()}


def answered_right(answer: dict) -> bool:
    return answer.get("outputs", [{}])[0].get("data") == [sum(ROW)]


def listing(gw: GatewayProcess) -> dict[str, dict]:
    status, body, _ = http("GET", gw.url + "/models")
    assert status == 200
    return {m["modelName"]: m for m in json.loads(body)["models"]}


def memory_evictions(gw: GatewayProcess) -> float:
    return sum(gw.metric("mme_model_evictions_total", {"tier": "memory", "reason": r}) for r in MEMORY_REASONS)


def epoch(ts: str) -> float:
    """A log line's `ts` (UTC, milliseconds) as seconds since the epoch."""
    whole, _, millis = ts.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000


def stub_rss(gw: GatewayProcess) -> dict[str, int]:
    """Real resident memory of each model's stub processes, read here, apart from the gateway's numbers."""
    stubs = stub_pids_by_model(gw.proc.pid, gw.cache_dir / "repo")
    probe = HostProbe()
    return {name: probe.process_bytes(pids) for name, pids in stubs.items()}


def put_models(s3, prefix: str, count: int, **params: object) -> list[str]:  # type: ignore[no-untyped-def]
    """`count` artifacts of the ballast model, each with its own bytes (so its own ETag: nothing measured for
    one counts as measured for another)."""
    keys = []
    for i in range(count):
        key = f"{prefix}/m{i:02d}.tar.gz"
        s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=ballast_artifact(seed=f"{prefix}-{i}", **params))
        keys.append(key)
    return keys


# ------------------------------------------------------------------------ 8 x 250 MB, 16 clients, room for 3


BALLAST_BUDGET = 838_860_800


def test_sixteen_clients_over_eight_models_of_250_mb_keep_the_budget(s3, s3_endpoint, tmp_path) -> None:
    """The measurement that broke the old cache (all 8 loaded, 1.98 GB against 0.84 GB): now evictions keep
    the gauge and the real stub memory within the budget plus at most one model's measured size while the
    first models are learned, and within the budget once every model has been measured."""
    keys = put_models(s3, "ballast", 8, ballast_bytes=200 * MIB)
    gw = _gateway(s3_endpoint, tmp_path, "--memory-budget-bytes", str(BALLAST_BUDGET))
    failures: list[str] = []
    samples: list[tuple[float, float, int]] = []  # (time, mme_memory_used_bytes, real stub RSS)
    stop = threading.Event()
    served = [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            key = rng.choice(keys)
            status, answer, _ = infer(gw, key)
            if status != 200 or not answered_right(answer):
                failures.append(f"{key}: {status} {answer}")
            served[0] += 1

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.time(), gw.metric("mme_memory_used_bytes"), sum(stub_rss(gw).values())))
            time.sleep(0.05)

    try:
        run_for(20, stop, [functools.partial(client, i) for i in range(16)] + [sampler])
        loaded = gw.events("model.loaded")
        evictions = memory_evictions(gw)
    finally:
        gw.stop()

    assert failures == []
    assert served[0] >= 16
    assert evictions > 0
    first_measured: dict[str, float] = {}
    for event in loaded:
        assert event["footprint_source"] == "measured"
        first_measured.setdefault(event["model"], epoch(event["ts"]))
    largest = max(event["footprint_bytes"] for event in loaded)
    assert largest > 200 * MIB  # the ballast is really held: 1 KB artifacts, 200+ MiB each
    assert len(samples) > 50
    over = [(t, used, rss) for t, used, rss in samples if used > BALLAST_BUDGET + largest]
    assert over == []
    real_over = [(t, used, rss) for t, used, rss in samples if rss > BALLAST_BUDGET + largest]
    assert real_over == []
    if len(first_measured) == len(keys):  # every model measured once: from then on, the budget itself
        learned_at = max(first_measured.values())
        late = [(t, used) for t, used, _ in samples if t > learned_at + 0.01 and used > BALLAST_BUDGET]
        assert late == []
    assert max(used for _, used, _ in samples) > BALLAST_BUDGET / 2  # the sampler saw the cache in use
    print(f"\nballast: {served[0]} requests, {evictions:.0f} evictions; budget {BALLAST_BUDGET}, largest model "
          f"{largest}; peak accounted {max(u for _, u, _ in samples):.0f}, peak stub RSS {max(r for _, _, r in samples)}")


# ------------------------------------------------- one gateway: concurrent loads, too large, growing models


BUDGET = 600_000_000


@pytest.fixture(scope="module")
def gw(s3, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = _gateway(s3_endpoint, tmp_path_factory.mktemp("budget-gw"), "--memory-budget-bytes", str(BUDGET),
                       "--max-concurrent-loads", "2", "--remeasure-interval", "0.5", "--min-residency", "0.5")
    try:
        yield gateway
    finally:
        gateway.stop()


def test_thirty_two_cold_requests_over_sixteen_models_load_two_at_a_time(s3, gw, tmp_path) -> None:
    trace = tmp_path / "trace"
    trace.mkdir()
    keys = put_models(s3, "burst", 16, init_sleep_s=0.5, trace_dir=trace)
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda key: infer(gw, key), keys + keys))
    assert [(status, answered_right(answer)) for status, answer, _ in results] == [(200, True)] * 32
    # Read inside the models themselves: when each `initialize` ran. Never more than two at once.
    spans = [json.loads(p.read_text()) for p in trace.glob("*.json")]
    assert len(spans) >= 16
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running, most = 0, 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert 1 <= most <= 2
    assert max(e["loads_in_flight"] for e in gw.events("model.load_started")) <= 2
    assert gw.metric("mme_memory_used_bytes") <= BUDGET


def test_a_model_that_measures_over_the_budget_is_refused_with_507_and_not_loaded_again(s3, gw) -> None:
    [big] = put_models(s3, "big", 1, ballast_bytes=700 * MIB)  # 1 KB estimated as its class: ~50 MB
    [small] = put_models(s3, "small", 1)
    status, answer, _ = infer(gw, big)
    assert status == 507, answer
    assert big in answer["error"] and str(BUDGET) in answer["error"] and "measured" in answer["error"]
    measured = int(answer["error"].split(" measured ")[1].split(" bytes")[0])
    assert measured > 700 * MIB
    assert infer(gw, small)[0] == 200  # the others keep answering
    assert gw.metric("mme_memory_used_bytes") <= BUDGET

    loads = gw.metric("mme_model_loads_total", {"result": "ok"})
    started = len(gw.events("model.load_started"))
    status, answer, _ = infer(gw, big)
    assert status == 507 and str(measured) in answer["error"], answer
    assert gw.metric("mme_model_loads_total", {"result": "ok"}) == loads  # refused from the measurement
    assert len(gw.events("model.load_started")) == started
    assert gw.metric("mme_memory_refusals_total", {"reason": "model_too_large"}) >= 2


def test_a_model_that_grows_on_every_request_is_accounted_and_others_make_room(s3, gw) -> None:
    fillers = put_models(s3, "filler", 8)
    [grower] = put_models(s3, "grow", 1, grow_bytes=30 * MIB)
    for key in fillers:
        assert infer(gw, key)[0] == 200
    evictions = gw.metric("mme_model_evictions_total", {"tier": "memory", "reason": "growth"})
    for _ in range(12):  # 360 MiB more than it was loaded with
        assert infer(gw, grower)[0] == 200
    name = [e["triton_name"] for e in gw.events("model.loaded") if e["model"] == grower][-1]  # the operator's log
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        accounted, real = listing(gw)[grower]["footprintBytes"], stub_rss(gw).get(name, 0)
        if real and abs(accounted - real) <= max(8 * MIB, real * 0.05) + 4 * MIB:
            break
        time.sleep(0.25)
    assert real > 360 * MIB
    assert abs(accounted - real) <= max(8 * MIB, real * 0.05) + 4 * MIB, (accounted, real)
    assert gw.metric("mme_model_evictions_total", {"tier": "memory", "reason": "growth"}) > evictions
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and gw.metric("mme_memory_used_bytes") > BUDGET:
        time.sleep(0.1)
    assert gw.metric("mme_memory_used_bytes") <= BUDGET
    assert sum(stub_rss(gw).values()) <= BUDGET + 8 * MIB * len(fillers)  # the real memory followed


# ----------------------------------------------------------------------------------------------- capacity


def test_at_capacity_a_load_is_served_to_its_waiters_before_it_can_be_evicted(s3, s3_endpoint, tmp_path) -> None:
    """32 clients over 20 models with room for about 5: each model's callers that waited for its load get
    it before it is evicted; whatever is refused is a retryable 503 with Retry-After on both edges."""
    keys = put_models(s3, "capacity", 20, ballast_bytes=40 * MIB)
    gw = _gateway(s3_endpoint, tmp_path, "--memory-budget-bytes", "500000000", "--max-concurrent-loads", "2")
    refused: list[str] = []
    ok = [0]
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        call = infer if seed % 2 else invoke
        while not stop.is_set():
            status, answer, headers = call(gw, rng.choice(keys))
            if status == 200:
                ok[0] += 1
            elif status != 503 or "retry-after" not in headers:
                refused.append(f"{call.__name__}: {status} {answer}")

    try:
        run_for(15, stop, [functools.partial(client, i) for i in range(32)])
        loaded, unloaded = gw.events("model.loaded"), gw.events("model.unloaded")
    finally:
        gw.stop()
    assert refused == []
    assert ok[0] > 32
    memory_evicted = [e for e in unloaded if e["reason"] in MEMORY_REASONS]
    assert memory_evicted
    waiting: dict[str, list[int]] = {}
    for event in loaded:
        waiting.setdefault(event["model"], []).append(event["waiters"])
    assert any(w > 0 for ws in waiting.values() for w in ws)  # loads did have callers waiting on them
    for event in memory_evicted:  # the n-th unload of a model ends its n-th load
        model_loads = waiting[event["model"]]
        index = sum(1 for e in memory_evicted[: memory_evicted.index(event)] if e["model"] == event["model"])
        assert event["served_since_load"] >= model_loads[index], event


def test_memory_held_by_busy_models_is_a_503_with_retry_after_on_every_protocol(s3, s3_endpoint, tmp_path) -> None:
    [slow] = put_models(s3, "busy-slow", 1, ballast_bytes=100 * MIB, sleep_s=6)
    [other] = put_models(s3, "busy-other", 1, ballast_bytes=100 * MIB)
    gw = _gateway(s3_endpoint, tmp_path, "--memory-budget-bytes", str(200 * MIB), "--admission-wait", "1",
                  "--min-residency", "0")
    try:
        holder = threading.Thread(target=infer, args=(gw, slow))
        holder.start()  # loads the slow model, then holds it for 6 s
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and listing(gw).get(slow, {}).get("leases", 0) < 1:
            time.sleep(0.1)
        status, answer, headers = infer(gw, other)
        assert (status, answer.get("code")) == (503, "MemoryBusy"), answer
        assert headers.get("retry-after") and other in answer["error"]
        status, answer, headers = invoke(gw, other)
        assert status == 503 and headers.get("retry-after"), answer
        assert headers.get("x-amzn-errortype", "").startswith("ServiceUnavailable")
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        features = grpcclient.InferInput("features", [1, 6], "FP32")
        features.set_data_from_numpy(np.array([ROW], dtype=np.float32))
        with pytest.raises(InferenceServerException) as error:
            client.infer(other, [features])
        assert error.value.status() == "StatusCode.UNAVAILABLE"
        holder.join(timeout=60)
        assert infer(gw, other)[0] == 200  # once the busy model is idle it makes room
        assert gw.metric("mme_memory_refusals_total", {"reason": "memory_busy"}) >= 3
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------ the OOM backstop


def test_out_of_memory_loads_evict_idle_models_and_succeed(s3, s3_endpoint, tmp_path) -> None:
    """The budget is too generous (the machine's memory), but the "device" fits only two of these models:
    a third load fails with a CUDA-style out-of-memory error. Each such failure unloads an idle model and
    retries, so every request succeeds and none fails forever."""
    markers = tmp_path / "loaded"
    markers.mkdir()
    keys = put_models(s3, "oom", 5, oom_marker_dir=markers, oom_max_siblings=2)
    gw = _gateway(s3_endpoint, tmp_path / "gw", "--min-residency", "0")
    try:
        for key in keys + keys:  # round robin: every load after the second meets two loaded siblings
            status, answer, _ = infer(gw, key)
            assert status == 200 and answered_right(answer), answer
        with ThreadPoolExecutor(max_workers=10) as pool:
            results = list(pool.map(lambda key: infer(gw, key), keys + keys))
        assert [status for status, _, _ in results] == [200] * 10, results
        assert gw.metric("mme_model_evictions_total", {"tier": "memory", "reason": "out_of_memory"}) >= 4
        assert gw.events("model.load_oom")
        assert len([m for m in listing(gw).values() if m["state"] == "ready"]) <= 3
    finally:
        gw.stop()
