"""Routing across three gateways: least-outstanding-requests against random, and affinity against none.

Three real gateways (each with its embedded Triton) on loopback, routers in front, one run:

1. Strategies. One Python model whose service time is the request's first feature, loaded on every
   instance; one trace of log-normal service times (heavy-tailed: median 20 ms, sigma 1) and Poisson arrival
   times (75% of the three instances' capacity) sent through a `least-outstanding-requests` router and a
   `random` router (spill off, so both choose among the same three copies). p50, p99 and throughput side by side; the aim is LOR p99 <= 2/3 of RANDOM's.
2. Affinity. A Zipf trace over more models than one instance's memory budget holds (each holds about half),
   through a router with affinity and one without (`--affinity off`: LOR over every instance, what a load
   balancer without model awareness does), after one warm-up request per model. Cold loads per 1,000
   requests from the gateways' own `mme_model_loads_total`; the aim is affinity cutting them tenfold or more.

    python benchmarks/routing.py [--requests 1000] [--cold-requests 400] [--out bench-results/routing.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mme_bench.stats import percentile  # noqa: E402
from mme_bench.workload import ModelChooser  # noqa: E402
from tests.helpers import GatewayProcess, RouterProcess, http, prometheus_samples, tar_gz  # noqa: E402

# Sleeps for its first input value (seconds), so the trace, not the model, decides every service time;
# holds `ballast_bytes` from initialize so that the memory budget counts it.
MODEL = '''
import json, time
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.ballast = np.ones(int(params.get("ballast_bytes", {}).get("string_value", "0")), dtype=np.uint8)

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb.get_input_tensor_by_name(request, "features").as_numpy()
            time.sleep(float(x[0, 0]))
            out.append(pb.InferenceResponse([pb.Tensor("total", x.sum(axis=1, keepdims=True).astype(np.float32))]))
        return out
'''
BALLAST = 48 << 20
BUDGET = 600 << 20  # about six models of ~90 MB (ballast + the stub's own memory)
COLD_MODELS = 12
CLIENTS = 4
MEDIAN_S, SIGMA = 0.02, 1.0


def artifact(ballast_bytes: int) -> bytes:
    config = ('backend: "python"\nmax_batch_size: 0\n'
              'input [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n'
              'output [{ name: "total" data_type: TYPE_FP32 dims: [-1, 1] }]\n'
              'instance_group [{ kind: KIND_CPU count: 1 }]\n'
              f'parameters {{ key: "ballast_bytes" value: {{ string_value: "{ballast_bytes}" }} }}\n')
    return tar_gz({"config.pbtxt": config.encode(), "1/model.py": MODEL.encode()})


def body(service_s: float) -> bytes:
    return json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                   "data": [service_s, 0, 0, 0, 0, 0]}]}).encode()


def summary(latencies: list[float], errors: int, wall_s: float, requests: int) -> dict:
    return {"requests": requests, "errors": errors, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "throughput_rps": len(latencies) / wall_s}


async def _send(session: aiohttp.ClientSession, url: str, model: str, service_s: float) -> float | None:
    """One inference; its latency in ms, None when it failed."""
    started = time.perf_counter()
    async with session.post(f"{url}/v2/models/{model}/infer", data=body(service_s)) as resp:
        await resp.read()
        return (time.perf_counter() - started) * 1000 if resp.status == 200 else None


async def open_loop(url: str, trace: list[tuple[str, float]], arrivals: list[float]) -> dict:
    """Each request sent at its arrival time whatever the answers (arrivals do not wait for the service)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        started = time.perf_counter()

        async def at(offset: float, model: str, service_s: float) -> float | None:
            await asyncio.sleep(max(started + offset - time.perf_counter(), 0))
            return await _send(session, url, model, service_s)

        results = await asyncio.gather(*(at(t, m, s) for t, (m, s) in zip(arrivals, trace)))
        wall = time.perf_counter() - started
    latencies = [r for r in results if r is not None]
    return summary(latencies, len(results) - len(latencies), wall, len(trace))


async def closed_loop(url: str, trace: list[tuple[str, float]], clients: int) -> dict:
    """`clients` clients take the trace's requests in order, each sending its next one after an answer."""
    latencies: list[float] = []
    errors = 0
    queue = iter(trace)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for model, service_s in queue:
            latency = await _send(session, url, model, service_s)
            if latency is None:
                errors += 1
            else:
                latencies.append(latency)

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return summary(latencies, errors, time.perf_counter() - started, len(trace))


def loads(gateways: list[GatewayProcess]) -> float:
    total = 0.0
    for gw in gateways:
        status, text, _ = http("GET", gw.url + "/metrics")
        total += sum(prometheus_samples(text.decode(), "mme_model_loads_total").values())
    return total


def unload_all(gateways: list[GatewayProcess], keys: list[str]) -> None:
    for gw in gateways:
        for key in keys:
            http("POST", f"{gw.url}/v2/repository/models/{key}/unload", b"{}", timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="requests in the strategies trace")
    parser.add_argument("--cold-requests", type=int, default=400, help="requests in the affinity trace")
    parser.add_argument("--utilisation", type=float, default=0.75,
                        help="offered load of the strategies trace, as a share of the three instances' capacity")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "routing.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    service = [float(s) for s in np.minimum(rng.lognormal(np.log(MEDIAN_S), SIGMA, args.requests), 2.0)]
    rate = args.utilisation * 3 / (MEDIAN_S * np.exp(SIGMA**2 / 2))  # requests/s; the mean service is median e^(s^2/2)
    arrivals = [float(t) for t in np.cumsum(rng.exponential(1 / rate, args.requests))]
    cold_keys = [f"cold/m{i:02d}.tar.gz" for i in range(COLD_MODELS)]
    cold_trace = [(k, 0.0) for k in ModelChooser(cold_keys, 0.8, args.seed).sample(args.cold_requests)]

    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        work = Path(tmp)
        store = work / "store"
        (store / "cold").mkdir(parents=True)
        (store / "tail.tar.gz").write_bytes(artifact(0))
        for key in cold_keys:
            (store / key).write_bytes(artifact(BALLAST))
        gateways = [GatewayProcess(["--store", str(store), "--memory-budget-bytes", str(BUDGET),
                                    "--min-residency", "0", "--log-level", "warning"], work / f"gw{i}")
                    for i in range(3)]
        routers: list[RouterProcess] = []
        try:
            for gw in gateways:
                gw.wait_ready()
            for gw in gateways:  # the tail model everywhere: both strategies choose among the same copies
                assert http("POST", f"{gw.url}/v2/models/tail.tar.gz/infer", body(0.0))[0] == 200
            common = ["--health-interval", "0.5", "--listing-interval", "1", "--log-level", "warning"]
            lor = RouterProcess(gateways, work / "lor", [*common, "--spill-threshold", "0"])
            rnd = RouterProcess(gateways, work / "random", [*common, "--spill-threshold", "0",
                                                            "--routing-strategy", "random"])
            affine = RouterProcess(gateways, work / "affinity", common)
            blind = RouterProcess(gateways, work / "no-affinity", [*common, "--affinity", "off"])
            routers = [lor, rnd, affine, blind]
            for r in routers:
                r.wait_healthy()
            time.sleep(2)  # a listing: every router knows the tail model is everywhere

            trace = [("tail.tar.gz", s) for s in service]
            strategies = {name: asyncio.run(open_loop(r.url, trace, arrivals)) for name, r in
                          (("least-outstanding-requests", lor), ("random", rnd))}
            cold: dict[str, dict] = {}
            for name, r in (("no affinity", blind), ("affinity", affine)):
                unload_all(gateways, cold_keys)
                start = loads(gateways)
                asyncio.run(closed_loop(r.url, [(k, 0.0) for k in cold_keys], 1))  # each model's first load
                before = loads(gateways)
                result = asyncio.run(closed_loop(r.url, cold_trace, CLIENTS))
                result["cold_loads"] = loads(gateways) - before
                result["warm_up_loads"] = before - start
                result["cold_loads_per_1000"] = 1000 * result["cold_loads"] / len(cold_trace)
                cold[name] = result
        finally:
            for r in routers:
                r.stop()
            for gw in gateways:
                gw.stop()

    print(f"\nStrategies: {args.requests} requests, log-normal service time (median 20 ms, sigma 1), Poisson "
          f"arrivals at {rate:.0f}/s ({args.utilisation:.0%} of capacity), one copy on each of 3 instances")
    print(f"{'strategy':<28}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}{'errors':>8}")
    for name, s in strategies.items():
        print(f"{name:<28}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}{s['throughput_rps']:>10.1f}{s['errors']:>8}")
    ratio = strategies["least-outstanding-requests"]["p99_ms"] / strategies["random"]["p99_ms"]
    print(f"LOR p99 / RANDOM p99 = {ratio:.2f} (aim: <= 0.67)")
    print(f"\nAffinity: {args.cold_requests} requests, Zipf 0.8 over {COLD_MODELS} models after one warm-up request per "
          f"model (its loads not counted), {CLIENTS} closed-loop clients; each instance's budget holds about 6")
    print(f"{'routing':<28}{'cold loads':>12}{'per 1000':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, c in cold.items():
        print(f"{name:<28}{c['cold_loads']:>12.0f}{c['cold_loads_per_1000']:>10.1f}{c['p50_ms']:>10.1f}"
              f"{c['p99_ms']:>10.1f}{c['errors']:>8}")
    cut = cold["no affinity"]["cold_loads"] / max(cold["affinity"]["cold_loads"], 1)
    bound = ">= " if cold["affinity"]["cold_loads"] == 0 else ""  # none left with affinity: the cut is at least this
    print(f"affinity cuts cold loads {bound}{cut:.1f}x (aim: >= 10x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"strategies": strategies, "affinity": cold, "lor_over_random_p99": ratio,
                                    "cold_load_cut": cut}, indent=2))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
