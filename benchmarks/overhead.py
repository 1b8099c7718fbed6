"""Gateway overhead: perf_analyzer against Triton directly and through the gateway, same model, one run.

For HTTP and gRPC, at concurrency 1 and 8, it prints throughput through the gateway as a share of direct
throughput, and the p50 and p99 latency the gateway adds. Targets: at least 0.85 of direct throughput at
concurrency 8, and at most 0.5 ms added to p50 at concurrency 1. The gateway, Triton and perf_analyzer
share this machine's cores, so on a small machine the gateway's CPU competes with Triton's.

    python benchmarks/overhead.py [--window-ms 2000] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.demo import write_artifact  # noqa: E402
from gateway.naming import model_key  # noqa: E402
from gateway.store import open_store  # noqa: E402
from gateway.triton.process import free_port  # noqa: E402
from mme_bench.config import PerfAnalyzerConfig  # noqa: E402
from mme_bench.launcher import log_tail, spawn_gateway, wait_ready  # noqa: E402
from mme_bench.perf import find_binary, parse_pa_csv, perf_command  # noqa: E402

KEY = "Chicago_IL.tar.gz"


def perf(binary: str, model: str, protocol: str, address: str, concurrency: int, window_ms: int, trials: int,
         out: Path, stability: int = 100) -> dict:
    """One perf_analyzer pass; returns throughput and p50/p99 in milliseconds."""
    cfg = PerfAnalyzerConfig(measurement_interval_ms=window_ms, stability_percentage=stability, max_trials=trials,
                             concurrency_range=f"{concurrency}:{concurrency}", timeout_s=600)
    proc = subprocess.run(perf_command(binary, cfg, model, address, out, protocol), capture_output=True, text=True,
                          timeout=cfg.timeout_s)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    row = parse_pa_csv(out)[0]
    return {"tps": row["inferences_per_s"], "p50_ms": row["p50_latency_ms"], "p99_ms": row["p99_latency_ms"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer measurement window")
    parser.add_argument("--trials", type=int, default=10, help="perf_analyzer max trials to reach stability")
    parser.add_argument("--stability", type=int, default=100,
                        help="perf_analyzer stability percentage (loose: shared machines are noisy)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--protocols", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    args = parser.parse_args()
    binary = find_binary(None)
    if binary is None:
        raise SystemExit(f"{Path(sys.executable).parent / 'perf_analyzer'} missing: run `make perf-analyzer`")

    with tempfile.TemporaryDirectory(prefix="mme-overhead-") as tmp:
        work = Path(tmp)
        write_artifact("Chicago_IL", work / "store" / KEY)
        ports = {name: free_port() for name in ("http", "grpc", "t_http", "t_grpc", "t_metrics")}
        cmd = [sys.executable, "-m", "gateway", "serve", "--store", str(work / "store"), "--cache-dir",
               str(work / "cache"), "--port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
               "--triton-http-port", str(ports["t_http"]), "--triton-grpc-port", str(ports["t_grpc"]),
               "--triton-metrics-port", str(ports["t_metrics"]), "--log-level", "warning"]
        url = f"http://127.0.0.1:{ports['http']}"
        gateway = spawn_gateway(cmd, url, work / "gateway.log", cwd=ROOT)
        try:
            outcome = wait_ready(gateway, 120.0, bound=None)  # --log-level warning: uvicorn's line is not logged
            if outcome != "ready":
                raise RuntimeError(f"gateway {outcome}:\n{log_tail(work / 'gateway.log')}")
            body = json.dumps({"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                           "data": [1994, 3188, 5, 1.5, 1.62, 3]}]}).encode()
            urllib.request.urlopen(urllib.request.Request(url + f"/v2/models/{KEY}/infer", data=body), timeout=120)
            triton_name = model_key(KEY, open_store(str(work / "store")).url).triton_name  # what Triton calls it

            targets = {
                ("http", "direct"): (triton_name, f"127.0.0.1:{ports['t_http']}"),
                ("http", "gateway"): (KEY, f"127.0.0.1:{ports['http']}"),
                ("grpc", "direct"): (triton_name, f"127.0.0.1:{ports['t_grpc']}"),
                ("grpc", "gateway"): (KEY, f"127.0.0.1:{ports['grpc']}"),
            }
            results: dict[tuple[str, str, int], dict] = {}
            print(f"perf_analyzer, model {KEY} (ONNX through the Python-backend runner), {os.cpu_count()} cores, "
                  f"window {args.window_ms} ms")
            for protocol in args.protocols:
                for c in args.concurrency:
                    for where in ("direct", "gateway"):  # interleaved, so drift hits both sides alike
                        model, address = targets[(protocol, where)]
                        r = perf(binary, model, protocol, address, c, args.window_ms, args.trials,
                                 work / f"{protocol}-{where}-{c}.csv", args.stability)
                        results[(protocol, where, c)] = r
                        print(f"  {protocol:4} c={c:<2} {where:7}: {r['tps']:8.1f} infer/s  p50 {r['p50_ms']:6.3f} ms"
                              f"  p99 {r['p99_ms']:6.3f} ms", flush=True)
            print()
            print(f"{'protocol':8} {'conc':>4} | {'throughput gw/direct':>20} | {'added p50 ms':>12} | {'added p99 ms':>12}")
            for protocol in args.protocols:
                for c in args.concurrency:
                    d, g = results[(protocol, "direct", c)], results[(protocol, "gateway", c)]
                    print(f"{protocol:8} {c:>4} | {g['tps'] / d['tps']:>20.3f} | {g['p50_ms'] - d['p50_ms']:>12.3f} | "
                          f"{g['p99_ms'] - d['p99_ms']:>12.3f}")
            print("\ntargets: throughput ratio >= 0.85 at concurrency 8; added p50 <= 0.5 ms at concurrency 1")
        finally:
            gateway.stop(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
