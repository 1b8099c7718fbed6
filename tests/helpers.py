"""Test helpers: artifacts built on the fly, and a gateway run as a real subprocess."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from http.client import HTTPResponse, RemoteDisconnected
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from gateway.demo import onnx_model
from gateway.triton.process import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def tar_gz(members: dict[str, bytes], extra: Iterable[tarfile.TarInfo] = ()) -> bytes:
    """A .tar.gz with the given regular files plus any hand-made TarInfo members (links, devices, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return buf.getvalue()


def city_artifact(city: str) -> bytes:
    return tar_gz({"model.onnx": onnx_model(city).SerializeToString()})


def v2_request(rows: list[list[float]], input_name: str = "features") -> bytes:
    return json.dumps(
        {"inputs": [{"name": input_name, "shape": [len(rows), len(rows[0])], "datatype": "FP32",
                     "data": [v for row in rows for v in row]}]}
    ).encode()


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 120.0) -> tuple[int, bytes, dict[str, str]]:
    """A plain HTTP call that returns (status, body, headers) for error statuses too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def run_for(seconds: float, stop: threading.Event, workers: Iterable[Callable[[], None]]) -> None:
    """Run each worker in its own thread for `seconds`, then set `stop` (which the workers watch) and join."""
    threads = [threading.Thread(target=worker) for worker in workers]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)


class GatewayProcess:
    """`python -m gateway serve ...` with its log captured; stopped with SIGTERM like in production."""

    def __init__(self, args: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = workdir / "gateway.log"
        self.cache_dir = workdir / "cache"
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port), "--grpc-port", str(self.grpc_port),
               "--cache-dir", str(self.cache_dir), *args]
        self._log = self.log_path.open("wb")
        self._cmd, self._env = cmd, {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=self._env)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would (its Triton follows through PDEATHSIG)."""
        self.proc.kill()
        self.proc.wait(timeout=30)

    def restart(self) -> "GatewayProcess":
        """The same command on the same ports and cache, after `kill()` or `stop()`; not waited for."""
        self._log.close()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env=self._env)
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> "GatewayProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if http("GET", self.url + "/v2/health/ready", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"gateway not ready after {timeout_s}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[dict]:
        """Structured log entries with this event name."""
        found = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("event") == event:
                    found.append(entry)
        return found

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Value of one Prometheus sample from /metrics (0.0 when absent)."""
        status, body, _ = http("GET", self.url + "/metrics")
        assert status == 200
        want = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        for line in body.decode().splitlines():
            if line.startswith("#"):
                continue
            sample, _, value = line.rpartition(" ")
            if sample == name + want:
                return float(value)
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# A Python-backend model whose memory is nothing like its artifact: `ballast_bytes` held from `initialize`,
# `grow_bytes` more kept on every request, `sleep_s` per request, `init_sleep_s` in `initialize` (which
# writes its start and end to `trace_dir`), and a CUDA-style out-of-memory error from `initialize` when
# `oom_max_siblings` or more of its siblings (counted through live pids in `oom_marker_dir`) are loaded.
_BALLAST_MODEL = '''
import json, os, time
import numpy as np
import triton_python_backend_utils as pb


def _param(config, key, default):
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        started = time.time()
        self.marker = None
        marker_dir = _param(config, "oom_marker_dir", "")
        if marker_dir:
            siblings = [p for p in os.listdir(marker_dir) if os.path.exists("/proc/" + p)]
            if len(siblings) >= int(_param(config, "oom_max_siblings", "0")):
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (%d siblings loaded)" % len(siblings))
            self.marker = os.path.join(marker_dir, str(os.getpid()))
            open(self.marker, "w").close()
        self.ballast = np.ones(int(_param(config, "ballast_bytes", "0")), dtype=np.uint8)  # touched: resident
        self.grow = int(_param(config, "grow_bytes", "0"))
        self.sleep = float(_param(config, "sleep_s", "0"))
        self.kept = []
        time.sleep(float(_param(config, "init_sleep_s", "0")))
        trace_dir = _param(config, "trace_dir", "")
        if trace_dir:
            with open(os.path.join(trace_dir, "%d.json" % os.getpid()), "w") as f:
                json.dump({"start": started, "end": time.time()}, f)

    def execute(self, requests):
        if self.sleep:
            time.sleep(self.sleep)
        if self.grow:
            self.kept.append(np.ones(self.grow, dtype=np.uint8))
        out = []
        for request in requests:
            x = pb.get_input_tensor_by_name(request, "features").as_numpy()
            out.append(pb.InferenceResponse([pb.Tensor("total", x.sum(axis=1, keepdims=True).astype(np.float32))]))
        return out

    def finalize(self):
        if self.marker and os.path.exists(self.marker):
            os.unlink(self.marker)
'''


def ballast_artifact(**params: object) -> bytes:
    """A .tar.gz of about 1 KB holding the model above; `params` become its config parameters."""
    config = ('backend: "python"\nmax_batch_size: 0\n'
              'input [{ name: "features" data_type: TYPE_FP32 dims: [-1, 6] }]\n'
              'output [{ name: "total" data_type: TYPE_FP32 dims: [-1, 1] }]\n'
              'instance_group [{ kind: KIND_CPU count: 1 }]\n')
    for key, value in params.items():
        config += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    return tar_gz({"config.pbtxt": config.encode(), "1/model.py": _BALLAST_MODEL.encode()})


LAG_BOUND_S = "0.05"  # issue 19's bound on the event loop's lag: a bucket of mme_event_loop_lag_seconds


def loop_lag_buckets(gw: "GatewayProcess") -> dict[str, float]:
    """`mme_event_loop_lag_seconds` from one /metrics read: cumulative observations by bucket bound (`le`,
    "+Inf" for all of them). Read before and after a burst, `late_ticks` tells what landed over a bound."""
    status, body, _ = http("GET", gw.url + "/metrics", timeout=30)
    assert status == 200, body[:200]
    return {dict(labels)["le"]: value for labels, value in
            prometheus_samples(body.decode(), "mme_event_loop_lag_seconds_bucket").items()}


def late_ticks(before: dict[str, float], after: dict[str, float], bound: str = LAG_BOUND_S) -> dict[str, int]:
    """Observations of the loop's lag over `bound` between two `loop_lag_buckets` reads, by the bucket they
    landed in (empty: the loop was never later than `bound`)."""
    bounds = sorted(after, key=float)
    late, below = {}, after[bound] - before[bound]
    for le in bounds:
        if float(le) > float(bound):
            count = int(after[le] - before[le] - below)
            if count:
                late[le] = count
            below = after[le] - before[le]
    return late


def http_bytes(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 request as it goes on the wire, path and headers exactly as given (no quoting, no
    checks): for requests a client library would refuse or repair, and built before a timed send."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def exchange(sock: socket.socket, request: bytes) -> tuple[int | None, bytes, float]:
    """Send a prepared request on a connected socket and read the whole answer: (status, body, seconds from
    the first byte sent to the answer's end). A gateway may answer from the headers and close before the body
    is sent through; the status is None when the connection was reset before any answer arrived."""
    started = time.monotonic()
    try:
        sock.sendall(request)
    except (BrokenPipeError, ConnectionResetError):
        pass  # answered (and closed) before reading the rest: the answer may still be there to read
    try:
        response = HTTPResponse(sock)
        response.begin()
        body = response.read()
    except (ConnectionResetError, RemoteDisconnected):
        return None, b"", time.monotonic() - started
    return response.status, body, time.monotonic() - started


def prometheus_samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of metric `name` in a /metrics text, keyed by its label set."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] = sample.value
    return found


class RouterProcess:
    """`python -m gateway router ...` in front of gateways, with its log captured; stopped with SIGTERM."""

    def __init__(self, instances: list[GatewayProcess], workdir: Path, args: Iterable[str] = ()) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.expected = len(instances)
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "router.log"
        listed = ",".join(f"127.0.0.1:{gw.port}:{gw.grpc_port}" for gw in instances)
        cmd = [sys.executable, "-m", "gateway", "router", "--port", str(self.port), "--grpc-port",
               str(self.grpc_port), *(["--instances", listed] if listed else []), *args]  # none: args discover
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)

    def metrics_text(self) -> str:
        status, body, _ = http("GET", self.url + "/metrics", timeout=10)
        assert status == 200
        return body.decode()

    def samples(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return prometheus_samples(self.metrics_text(), name)

    def healthy_count(self) -> int:
        return int(sum(self.samples("mme_router_instance_healthy").values()))

    def wait_healthy(self, count: int | None = None, timeout_s: float = 60.0) -> "RouterProcess":
        """Until `count` instances (default: all) take traffic."""
        want = self.expected if count is None else count
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"router exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if self.healthy_count() == want:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"router did not see {want} healthy instances in {timeout_s}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class MotoServer:
    """A moto S3 server on a loopback port of its own, which a test or benchmark can stop and start again on the
    same port (moto keeps its objects in the process meanwhile): a store that goes away and comes back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> "MotoServer":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(pid: int, name: bytes = b"") -> list[int]:
    """Processes under `pid` (any depth), those whose command line contains `name` when one is given."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found = []
    for child in parents:
        ancestor = parents.get(child)
        while ancestor and ancestor != pid:
            ancestor = parents.get(ancestor)
        if ancestor == pid and name in cmdline(child):
            found.append(child)
    return found


T = TypeVar("T")


def polled(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 5.0) -> T:
    """`read()` again until `done` accepts it or `timeout_s` passes; the last reading either way (for what
    Triton records just after it answers, such as its statistics)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)

