"""Test helpers: artifacts built on the fly, and a gateway run as a real subprocess."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Iterable

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
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env={**os.environ, **(env or {})})

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
