"""Soak: thousands of models, Zipf traffic, a memory budget for a fraction of them, and failures on purpose.

One gateway with its embedded Triton in front of a moto S3 server (on loopback, in this process) holding
`--store-models` artifacts (10,000 by default), of which `--distinct` (1,000) are invoked with Zipf
popularity at `--rate` requests per second for `--duration` seconds, under a memory budget of
`--budget-models` models. On a schedule the harness
  1. kills one loaded model's stub (SIGKILL),
  2. kills Triton (SIGKILL),
  3. stops S3 for `--s3-outage` seconds,
and at the end it reports every failed request by cause (a failure it caused on purpose is accounted to
that cause; anything else is unexplained), p50/p99 latency, cold loads, evictions, the gateway's RSS over
time, and what was left behind after the gateway stopped (processes, files in its scratch space).

    python benchmarks/soak.py [--duration 480] [--out bench-results/soak.json]      # make bench-soak

The models are small Python-backend models (a sum of the features; numpy only), so that a cold load costs
what Triton's stub start-up costs and the run exercises the gateway, not the models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mme_bench.stats import percentile  # noqa: E402
from mme_bench.workload import ModelChooser  # noqa: E402
from tests.helpers import (  # noqa: E402
    GatewayProcess,
    MotoServer,
    cmdline,
    descendants,
    http,
    prometheus_samples,
    tar_gz,
)

MODEL = '''
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb.get_input_tensor_by_name(request, "features").as_numpy()
            out.append(pb.InferenceResponse([pb.Tensor("total", x.sum(axis=1, keepdims=True).astype(np.float32))]))
        return out
'''
CONFIG = ('backend: "python"\nmax_batch_size: 0\ninput [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n'
          'output [{ name: "total" data_type: TYPE_FP32 dims: [-1, 1] }]\n'
          'instance_group [{ kind: KIND_CPU count: 1 }]\nparameters { key: "model_id" value: { string_value: "%d" } }\n')
BODY = json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                               "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}]}).encode()
S3_ENV = {"AWS_ACCESS_KEY_ID": "soak", "AWS_SECRET_ACCESS_KEY": "soak", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}
BUCKET = "soak"


@dataclass
class Outcome:
    sent: float  # seconds from the start of traffic
    key: str
    status: int
    latency_s: float
    code: str


@dataclass
class Events:
    stub_killed_at: float | None = None
    stub_model: str | None = None
    triton_killed_at: float | None = None
    triton_back_at: float | None = None
    s3_down_at: float | None = None
    s3_up_at: float | None = None


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


def fill_store(moto: MotoServer, count: int) -> list[str]:
    """`count` artifacts, each its own bytes (and so its own ETag); uploaded 16 at a time."""
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    keys = [f"m/{i:05d}.tar.gz" for i in range(count)]

    def put(i: int) -> None:
        body = tar_gz({"config.pbtxt": (CONFIG % i).encode(), "1/model.py": MODEL.encode()})
        s3.put_object(Bucket=BUCKET, Key=f"models/{keys[i]}", Body=body)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for done, _ in enumerate(pool.map(put, range(count)), start=1):
            if done % 2000 == 0:
                log(f"store: {done}/{count} artifacts uploaded")
    log(f"store: {count} artifacts in {time.monotonic() - started:.0f}s")
    return keys


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def metric_total(gw: GatewayProcess, name: str, **labels: str) -> float:
    status, body, _ = http("GET", gw.url + "/metrics", timeout=10)
    if status != 200:
        return float("nan")
    want = set(labels.items())
    return sum(v for k, v in prometheus_samples(body.decode(), name).items() if want <= set(k))


def _overlaps(o: Outcome, start: float | None, end: float | None) -> bool:
    """The request was in flight at some moment of [start, end]."""
    return start is not None and o.sent <= (end if end is not None else 1e18) and o.sent + o.latency_s >= start


def classify(o: Outcome, ev: Events) -> str:
    """The cause a failed request is accounted to: one the harness caused, or "unexplained"."""
    if o.key == ev.stub_model and _overlaps(o, ev.stub_killed_at, (ev.stub_killed_at or 0) + 20):
        return "stub killed"
    if _overlaps(o, ev.triton_killed_at, (ev.triton_back_at or 1e18) + 2):
        return "Triton killed"
    if o.status == 502 and _overlaps(o, ev.s3_down_at, (ev.s3_up_at or 1e18) + 5):
        return "S3 stopped (a model never staged)"
    return "unexplained"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-models", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=1_000, help="models the traffic draws from (Zipf)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the popularity")
    parser.add_argument("--rate", type=float, default=2.5,
                        help="requests per second, open loop (sized so that the cold loads it causes, about one a "
                             "second, are what a 2-core machine's Triton can start)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=480.0, help="seconds of traffic")
    parser.add_argument("--budget-models", type=int, default=100, help="memory budget, in models of ~45 MB")
    parser.add_argument("--s3-outage", type=float, default=60.0)
    parser.add_argument("--out", default="bench-results/soak.json")
    args = parser.parse_args()

    os.environ.update(S3_ENV)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    work = Path(tempfile.mkdtemp(prefix="mme-soak-"))
    moto = MotoServer().start()
    keys = fill_store(moto, args.store_models)[: args.distinct]
    budget = args.budget_models * (45 << 20)
    gw = GatewayProcess(["--store", f"s3://{BUCKET}/models/", "--s3-endpoint-url", moto.url,
                         "--memory-budget-bytes", str(budget), "--etag-ttl", "10", "--infer-timeout", "15",
                         "--load-timeout", "120", "--wait-timeout", "60"], work / "gw", env=S3_ENV).wait_ready()
    log(f"gateway up (pid {gw.proc.pid}), budget {budget >> 20} MiB; traffic {args.rate}/s over {args.distinct} "
        f"models for {args.duration:.0f}s")
    events = Events()
    outcomes: list[Outcome] = []
    rss: list[tuple[float, int]] = []
    lock = threading.Lock()
    stop = threading.Event()
    chooser = ModelChooser(keys, args.zipf, seed=7)
    arrivals = np.cumsum(np.random.default_rng(11).exponential(1.0 / args.rate, size=int(args.rate * args.duration * 1.2)))
    arrivals = arrivals[arrivals < args.duration]
    order = chooser.sample(len(arrivals))
    next_index = [0]
    t0 = time.monotonic()

    def client() -> None:
        while not stop.is_set():
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(arrivals):
                return
            delay = t0 + arrivals[i] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            key, sent = order[i], time.monotonic()
            try:
                status, body, _ = http("POST", f"{gw.url}/v2/models/{key}/infer", BODY, timeout=120)
            except OSError as exc:
                status, body = 599, str(exc).encode()
            code = ""
            if status != 200:
                try:
                    code = json.loads(body).get("code", "")
                except ValueError:
                    code = body[:80].decode(errors="replace")
            with lock:
                outcomes.append(Outcome(sent - t0, key, status, time.monotonic() - sent, code))

    def sampler() -> None:
        while not stop.wait(5.0):
            rss.append((time.monotonic() - t0, rss_bytes(gw.proc.pid)))

    def chaos() -> None:
        schedule = {"stub": args.duration * 0.15, "triton": args.duration * 0.35, "s3": args.duration * 0.6}
        if stop.wait(schedule["stub"]):
            return
        status, body, _ = http("POST", f"{gw.url}/v2/repository/index", b'{"ready": true}')
        ready = [row["name"] for row in json.loads(body)] if status == 200 else []
        for key in ready:
            stem = key.split("/")[-1].removesuffix(".tar.gz")
            stubs = [p for p in descendants(gw.proc.pid) if b"triton_python_backend_stub" in cmdline(p)
                     and f"--{stem}-".encode() in cmdline(p)]
            if stubs:
                for pid in stubs:
                    os.kill(pid, signal.SIGKILL)
                events.stub_killed_at, events.stub_model = time.monotonic() - t0, key
                log(f"chaos: killed the stub of {key}")
                break
        if stop.wait(max(0.0, t0 + schedule["triton"] - time.monotonic())):
            return
        triton = [p for p in descendants(gw.proc.pid) if b"tritonserver" in cmdline(p)
                  and b"triton_python_backend_stub" not in cmdline(p)]
        restarts = metric_total(gw, "mme_triton_restarts_total")
        for pid in triton:
            os.kill(pid, signal.SIGKILL)
        events.triton_killed_at = time.monotonic() - t0
        log("chaos: killed Triton")
        while not stop.is_set():  # back: the gateway has restarted it (not merely not noticed yet) and is ready
            if (metric_total(gw, "mme_triton_restarts_total") > restarts
                    and http("GET", f"{gw.url}/v2/health/ready", timeout=5)[0] == 200):
                events.triton_back_at = time.monotonic() - t0
                log(f"chaos: Triton back after {events.triton_back_at - events.triton_killed_at:.1f}s")
                break
            time.sleep(0.2)
        if stop.wait(max(0.0, t0 + schedule["s3"] - time.monotonic())):
            return
        moto.stop()
        events.s3_down_at = time.monotonic() - t0
        log("chaos: S3 stopped")
        stop.wait(args.s3_outage)
        for attempt in range(30):  # the old server's port may take a moment to be free
            try:
                moto.start()
                break
            except OSError as exc:
                log(f"chaos: S3 restart failed ({exc}); retrying")
                time.sleep(1)
        events.s3_up_at = time.monotonic() - t0
        log("chaos: S3 back")

    def chaos_logged() -> None:
        try:
            chaos()
        except Exception as exc:  # a harness failure must show, not end the chaos silently
            log(f"chaos: failed: {exc!r}")
            raise

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    helpers = [threading.Thread(target=sampler), threading.Thread(target=chaos_logged)]
    for thread in threads + helpers:
        thread.start()
    while any(t.is_alive() for t in threads):
        time.sleep(10)
        with lock:
            done, failed = len(outcomes), sum(1 for o in outcomes if o.status != 200)
        log(f"{time.monotonic() - t0:.0f}s: {done}/{len(arrivals)} requests, {failed} failed, "
            f"gateway RSS {rss_bytes(gw.proc.pid) >> 20} MiB")
    stop.set()
    for thread in helpers:
        thread.join(timeout=120)

    cold_loads = metric_total(gw, "mme_model_loads_total", result="ok")
    evictions = metric_total(gw, "mme_model_evictions_total")
    unhealthy = metric_total(gw, "mme_model_unhealthy_total")
    stale = metric_total(gw, "mme_store_unreachable_served_staged_total")
    gateway_pid, scratch = gw.proc.pid, gw.cache_dir / "tmp"
    before_stop = set(descendants(gateway_pid))
    gw.stop()
    time.sleep(2)
    leftover_processes = [p for p in before_stop if Path(f"/proc/{p}").exists()]
    leftover_processes += [int(p) for p in os.listdir("/proc") if p.isdigit() and str(work).encode() in cmdline(int(p))]
    leftover_files = [str(p.relative_to(scratch)) for p in scratch.rglob("*")] if scratch.exists() else []
    moto.stop()

    failures = [o for o in outcomes if o.status != 200]
    causes = Counter(classify(o, events) for o in failures)
    by_status = Counter(f"{o.status} {o.code}".strip() for o in failures)
    latencies = [o.latency_s * 1000 for o in outcomes if o.status == 200]
    third = max(1, len(rss) // 5)
    early = float(np.mean([b for _, b in rss[third: 2 * third]])) if len(rss) >= 5 else float("nan")
    late = float(np.mean([b for _, b in rss[-third:]])) if rss else float("nan")
    report = {
        "store_models": args.store_models, "distinct": args.distinct, "rate": args.rate, "duration_s": args.duration,
        "budget_bytes": budget, "requests": len(outcomes), "ok": len(outcomes) - len(failures),
        "distinct_invoked": len({o.key for o in outcomes}),
        "failed_by_cause": dict(causes), "failed_by_status": dict(by_status),
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p99_ms": percentile(latencies, 99) if latencies else None,
        "cold_loads": cold_loads, "evictions": evictions, "models_restarted_unhealthy": unhealthy,
        "served_from_disk_while_store_down": stale, "events": asdict(events),
        "gateway_rss_mib": [(round(t), b >> 20) for t, b in rss],
        "rss_growth_late_vs_early": (late / early - 1) if early == early and early else None,
        "leftover_processes": sorted(set(leftover_processes)), "leftover_scratch_files": leftover_files,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n| | |\n|---|---|")
    for name in ("requests", "ok", "distinct_invoked", "failed_by_cause", "failed_by_status", "p50_ms", "p99_ms",
                 "cold_loads", "evictions", "models_restarted_unhealthy", "served_from_disk_while_store_down",
                 "rss_growth_late_vs_early", "leftover_processes", "leftover_scratch_files"):
        value = report[name]
        print(f"| {name} | {round(value, 3) if isinstance(value, float) else value} |")
    rss_line = ", ".join(f"{t}s:{m}" for t, m in report["gateway_rss_mib"][:: max(1, len(rss) // 12)])
    print(f"\ngateway RSS (MiB) over time: {rss_line}\nwritten: {out}")
    unexplained = causes.get("unexplained", 0)
    return 0 if unexplained == 0 and not report["leftover_processes"] and not leftover_files else 1


if __name__ == "__main__":
    sys.exit(main())
