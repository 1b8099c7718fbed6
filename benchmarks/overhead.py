"""Gateway overhead: perf_analyzer against Triton directly, through nginx, through a bare Python forwarder and
through the gateway; same Triton, same models, one run.

For HTTP and gRPC it measures the demo model at concurrency 1 and 8, and a model taking a 1 MiB tensor
(binary tensor data on HTTP, raw_input_contents on gRPC). Every (direct, nginx, floor, gateway) set is
measured `--passes` times, interleaved, and the table gives the median of each pass's ratio to direct with
its spread (min-max over the passes): on a noisy 2-core machine one pass can be off by a third.

- nginx (`nginx-light`: keep-alive `proxy_pass`, `grpc_pass`) is the native floor; skipped with a note when
  it is not installed (`make bench-overhead` installs it where it can).
- floor is the least a hop on the gateway's own stack costs (`benchmarks/forwarders.py`): uvicorn with a
  raw ASGI app and the gateway's Triton HTTP client; a grpc.aio generic handler forwarding bytes.

Targets, checked at the end: HTTP adds at most 0.3 ms to p50 at concurrency 1, gRPC at most 0.5 ms; at
concurrency 8 and for the 1 MiB tensor, the gateway's throughput is at least 0.95 of nginx's.

    python benchmarks/overhead.py [--passes 3] [--window-ms 1500] [--out overhead.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.forwarders import nginx_config  # noqa: E402
from gateway.demo import write_artifact  # noqa: E402
from gateway.naming import model_key  # noqa: E402
from gateway.store import open_store  # noqa: E402
from gateway.triton import auth  # noqa: E402
from gateway.triton.process import free_port  # noqa: E402
from mme_bench.config import PerfAnalyzerConfig  # noqa: E402
from mme_bench.launcher import log_tail, spawn_gateway, wait_ready  # noqa: E402
from mme_bench.perf import find_binary, parse_pa_csv, perf_command  # noqa: E402

SMALL = "Chicago_IL.tar.gz"
LARGE = "Tensor1MiB.tar.gz"
LARGE_WIDTH = 1 << 18  # FP32 elements: 1 MiB per request
TARGETS = ("direct", "nginx", "floor", "gateway")
HTTP_ADDED_P50_MS, GRPC_ADDED_P50_MS, OF_NGINX = 0.3, 0.5, 0.95


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    shape: str
    concurrency: int


def large_artifact(dest: Path) -> None:
    """A .tar.gz whose ONNX model sums a [batch, 262144] FP32 tensor: 1 MiB in, 4 bytes out, so the pass
    measures moving the request, not computing or answering."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["tensor", "axes"], ["total"], keepdims=1)], "tensor_sum",
        inputs=[helper.make_tensor_value_info("tensor", TensorProto.FLOAT, ["batch", LARGE_WIDTH])],
        outputs=[helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data = model.SerializeToString()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def perf(binary: str, model: str, shape: str, protocol: str, address: str, concurrency: int, window_ms: int,
         out: Path, extra_args: tuple[str, ...] = ()) -> dict[str, float]:
    """One perf_analyzer pass: throughput, p50 and p99 (ms)."""
    cfg = PerfAnalyzerConfig(shape=shape, measurement_interval_ms=window_ms, stability_percentage=100, max_trials=10,
                             concurrency_range=f"{concurrency}:{concurrency}", timeout_s=600, extra_args=extra_args)
    proc = subprocess.run(perf_command(binary, cfg, model, address, out, protocol), capture_output=True, text=True,
                          timeout=cfg.timeout_s)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    row = parse_pa_csv(out)[0]
    return {"tps": row["inferences_per_s"], "p50_ms": row["p50_latency_ms"], "p99_ms": row["p99_latency_ms"]}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


class Bench:
    """The processes under test: one gateway (and its embedded Triton), nginx, the two bare forwarders."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ports = {name: free_port() for name in ("http", "grpc", "t_http", "t_grpc", "t_metrics", "nginx_http",
                                                     "nginx_grpc", "floor_http", "floor_grpc")}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.triton_key = auth.new_key()  # Triton's restricted APIs: the gateway, the forwarders and direct calls send it
        self.gateway: Any = None
        self.nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)

    def start(self) -> None:
        p, work = self.ports, self.work
        store = work / "store"
        write_artifact("Chicago_IL", store / SMALL)
        large_artifact(store / LARGE)
        cmd = [sys.executable, "-m", "gateway", "serve", "--store", str(store), "--cache-dir", str(work / "cache"),
               "--port", str(p["http"]), "--grpc-port", str(p["grpc"]), "--triton-http-port", str(p["t_http"]),
               "--triton-grpc-port", str(p["t_grpc"]), "--triton-metrics-port", str(p["t_metrics"]),
               "--log-level", "warning", "--triton-api-key-file", str(work / "triton-key")]
        (work / "triton-key").write_text(self.triton_key)
        url = f"http://127.0.0.1:{p['http']}"
        self.gateway = spawn_gateway(cmd, url, work / "gateway.log", cwd=ROOT)
        outcome = wait_ready(self.gateway, 120.0, bound=None)  # --log-level warning: uvicorn's line is not logged
        if outcome != "ready":
            raise RuntimeError(f"gateway {outcome}:\n{log_tail(work / 'gateway.log')}")
        for key, body in ((SMALL, {"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                                                "data": [1994, 3188, 5, 1.5, 1.62, 3]}]}),
                          (LARGE, {"inputs": [{"name": "tensor", "shape": [1, LARGE_WIDTH], "datatype": "FP32",
                                               "data": [1.0] * LARGE_WIDTH}]})):
            request = urllib.request.Request(f"{url}/v2/models/{key}/infer", data=json.dumps(body).encode())
            urllib.request.urlopen(request, timeout=120).read()  # loaded now: every target finds it warm
        forwarders = ROOT / "benchmarks" / "forwarders.py"
        self.procs.append(subprocess.Popen([sys.executable, str(forwarders), "http", str(p["floor_http"]),
                                            f"127.0.0.1:{p['t_http']}", str(work / "triton-key")]))
        self.procs.append(subprocess.Popen([sys.executable, str(forwarders), "grpc", str(p["floor_grpc"]),
                                            f"127.0.0.1:{p['t_grpc']}", str(work / "triton-key")]))
        if self.nginx:
            for temp in ("nginx-body", "nginx-proxy"):
                (work / temp).mkdir(exist_ok=True)
            conf = work / "nginx.conf"
            conf.write_text(nginx_config(work, p["nginx_http"], p["nginx_grpc"], f"127.0.0.1:{p['t_http']}",
                                         f"127.0.0.1:{p['t_grpc']}", self.triton_key))
            self.procs.append(subprocess.Popen([self.nginx, "-c", str(conf), "-p", str(work), "-e",
                                                str(work / "nginx-error.log")]))
        time.sleep(2.0)
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")

    def targets(self) -> list[str]:
        return [t for t in TARGETS if t != "nginx" or self.nginx]

    def address(self, target: str, protocol: str, key: str) -> tuple[str, str]:
        """(model name, host:port) perf_analyzer is given for `target`: Triton's internal name except through
        the gateway, which takes the TargetModel."""
        port = {"direct": "t_", "nginx": "nginx_", "floor": "floor_", "gateway": ""}[target] + protocol
        name = key if target == "gateway" else model_key(key, open_store(str(self.work / "store")).url).triton_name
        return name, f"127.0.0.1:{self.ports[port]}"

    def secret_args(self, target: str, protocol: str) -> tuple[str, ...]:
        """perf_analyzer's header carrying Triton's secret, for the target that calls Triton itself."""
        if target != "direct":
            return ()
        return ("-H", f"{auth.HEADER if protocol == 'http' else auth.GRPC_METADATA}:{self.triton_key}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.gateway is not None:
            self.gateway.stop(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes per (protocol, case)")
    parser.add_argument("--window-ms", type=int, default=1500, help="perf_analyzer measurement window")
    parser.add_argument("--protocols", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    parser.add_argument("--large-concurrency", type=int, nargs="+", default=[8],
                        help="concurrency levels of the 1 MiB case")
    parser.add_argument("--cases", nargs="+", default=["demo", "1MiB"], choices=["demo", "1MiB"])
    parser.add_argument("--out", type=Path, help="also write every pass as JSON here")
    args = parser.parse_args()
    binary = find_binary(None)
    if binary is None:
        raise SystemExit(f"{Path(sys.executable).parent / 'perf_analyzer'} missing: run `make perf-analyzer`")
    cases = [case for case in (Case("demo", SMALL, "features:1,6", 1), Case("demo", SMALL, "features:1,6", 8),
                               *(Case("1MiB", LARGE, f"tensor:1,{LARGE_WIDTH}", c) for c in args.large_concurrency))
             if case.name in args.cases]

    with tempfile.TemporaryDirectory(prefix="mme-overhead-") as tmp:
        bench = Bench(Path(tmp))
        try:
            bench.start()
            targets = bench.targets()
            print(f"perf_analyzer, {os.cpu_count()} cores, window {args.window_ms} ms, {args.passes} interleaved "
                  f"passes; targets: {', '.join(targets)}")
            if not bench.nginx:
                print("  nginx not found: the nginx column is skipped (Debian: apt-get install nginx-light)")
            runs: dict[tuple[str, str, int, str], list[dict[str, float]]] = {}
            for protocol in args.protocols:
                for case in cases:
                    for n in range(args.passes):
                        order = targets[n % len(targets):] + targets[:n % len(targets)]  # rotated: no fixed slot
                        for target in order:
                            model, address = bench.address(target, protocol, case.model)
                            r = perf(binary, model, case.shape, protocol, address, case.concurrency, args.window_ms,
                                     Path(tmp) / f"{protocol}-{case.name}-{case.concurrency}-{target}-{n}.csv",
                                     bench.secret_args(target, protocol))
                            runs.setdefault((protocol, case.name, case.concurrency, target), []).append(r)
                            print(f"  {protocol:4} {case.name:5} c={case.concurrency:<2} pass {n + 1} {target:8}: "
                                  f"{r['tps']:8.1f} infer/s  p50 {r['p50_ms']:6.3f} ms  p99 {r['p99_ms']:6.3f} ms",
                                  flush=True)
        finally:
            bench.stop()

    print()
    print("Per target: throughput as a share of direct, and the p50 it adds (ms); medians of the passes, "
          "[min-max]")
    header = f"{'protocol':8} {'case':5} {'conc':>4} | {'direct/s':>8}"
    for target in targets[1:]:
        header += f" | {target + ' tput':>21} {target + ' +p50':>21}"
    header += f" | {'gateway/nginx':>21}" if "nginx" in targets else ""
    print(header)
    verdicts = []
    for protocol in args.protocols:
        for case in cases:
            key = (protocol, case.name, case.concurrency)
            direct = runs[(*key, "direct")]
            line = f"{protocol:8} {case.name:5} {case.concurrency:>4} | {statistics.median(r['tps'] for r in direct):8.0f}"
            ratio: dict[str, list[float]] = {}
            added: dict[str, list[float]] = {}
            for target in targets[1:]:
                mine = runs[(*key, target)]
                ratio[target] = [m["tps"] / d["tps"] for m, d in zip(mine, direct)]
                added[target] = [m["p50_ms"] - d["p50_ms"] for m, d in zip(mine, direct)]
                line += f" | {spread(ratio[target]):>21} {spread(added[target]):>21}"
            if "nginx" in targets:
                of_nginx = [g["tps"] / n["tps"] for g, n in zip(runs[(*key, "gateway")], runs[(*key, "nginx")])]
                line += f" | {spread(of_nginx):>21}"
                if case.concurrency > 1 or case.name != "demo":
                    verdicts.append((f"{protocol} {case.name} c={case.concurrency}: gateway throughput >= "
                                     f"{OF_NGINX} of nginx", statistics.median(of_nginx), OF_NGINX, ">="))
            if case.concurrency == 1 and case.name == "demo":
                bound = HTTP_ADDED_P50_MS if protocol == "http" else GRPC_ADDED_P50_MS
                verdicts.append((f"{protocol} c=1: gateway adds <= {bound} ms to p50", statistics.median(added["gateway"]),
                                 bound, "<="))
                verdicts.append((f"{protocol} c=1: the floor ({'uvicorn' if protocol == 'http' else 'grpc.aio'}) "
                                 "adds", statistics.median(added["floor"]), None, ""))
            print(line)
    print()
    for what, value, bound, op in verdicts:
        if bound is None:
            print(f"  {'':4} {what}: {value:.3f}")
            continue
        met = value >= bound if op == ">=" else value <= bound
        print(f"  {'met ' if met else 'MISS'} {what}: {value:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([{"protocol": k[0], "case": k[1], "concurrency": k[2], "target": k[3],
                                         "passes": v} for k, v in runs.items()], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
