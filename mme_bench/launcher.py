"""Start a gateway per measured session (`python -m gateway serve ...`) and stop it afterwards.

Each session gets a fresh cache directory, so every benchmark starts from a cold cache, and its own
log file in the results. The command line is built from the target's settings and passed through
verbatim otherwise (`extra_args`), so flags the gateway gains later need no change here.

Two things go wrong in practice and get clear handling:
- a port taken between choosing it and binding it (another process on the machine): the gateway exits
  with "address already in use" and is started again on another port; a readiness answer only counts
  once our own log says uvicorn bound the port, so another server on that port is never taken for ours;
- a flag the gateway does not accept (in `extra_args`): argparse exits with "unrecognized arguments",
  and the run fails with the gateway's own message.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mme_bench.config import LauncherConfig, TargetConfig
from gateway.triton.process import free_port

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the gateway gets SIGTERM if the bench dies (Ctrl-C, crash), so no
    gateway outlives its benchmark. Linux delivers it when the *thread* that started the child exits, so
    gateways are started from the main thread."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class LaunchError(RuntimeError):
    """The gateway did not come up; the message carries the end of its log."""


@dataclass
class GatewaySession:
    """A running gateway the bench started (or a URL it was given, with `proc` None)."""

    url: str
    target: str
    max_concurrency: int | None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def terminate(self) -> None:
        """Ask the gateway to stop (SIGTERM: it drains and stops its Triton) without waiting for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then wait; SIGKILL after `timeout_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("bench.gateway_kill", extra={"target": self.target, "pid": self.proc.pid})
            self.proc.kill()
            self.proc.wait()


def serve_command(target: TargetConfig, launcher: LauncherConfig, cache_dir: Path, port: int,
                  max_concurrency: int | None) -> list[str]:
    """The `python -m gateway serve` command line for one session of `target`."""
    python = launcher.python or sys.executable
    cmd = [python, "-m", "gateway", "serve", "--store", str(launcher.store), "--cache-dir", str(cache_dir),
           "--port", str(port), "--grpc-port", "0"]
    if launcher.s3_endpoint_url:
        cmd += ["--s3-endpoint-url", launcher.s3_endpoint_url]
    if target.instance_type:
        cmd += ["--instance-type", target.instance_type]
    if target.memory_budget_bytes is not None:
        cmd += ["--memory-budget-bytes", str(target.memory_budget_bytes)]
    cap = max_concurrency if max_concurrency is not None else target.max_concurrency
    if cap is not None:
        cmd += ["--max-concurrency", str(cap)]
    return cmd + list(launcher.extra_args) + list(target.extra_args)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v2/health/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start_gateway(target: TargetConfig, launcher: LauncherConfig, session_dir: Path,
                  max_concurrency: int | None = None) -> GatewaySession:
    """Start `target` in `session_dir` (cache + log) and wait until it answers ready."""
    if not target.launched:
        assert target.url is not None
        return GatewaySession(url=target.url.rstrip("/"), target=target.name, max_concurrency=max_concurrency)
    session_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        port = free_port()
        cache_dir = session_dir / "cache"
        cmd = serve_command(target, launcher, cache_dir, port, max_concurrency)
        log_path = session_dir / ("gateway.log" if attempt == 0 else f"gateway.retry{attempt}.log")
        log.info("bench.gateway_start", extra={"target": target.name, "port": port, "cmd": " ".join(cmd)})
        session = spawn_gateway(cmd, f"http://127.0.0.1:{port}", log_path, target.name, max_concurrency)
        outcome = wait_ready(session, launcher.startup_timeout_s)
        if outcome == "ready":
            log.info("bench.gateway_ready", extra={"target": target.name, "url": session.url})
            return session
        tail = log_tail(log_path)
        if outcome == "port_taken":
            continue
        unknown = re.search(r"unrecognized arguments: (.*)", tail)
        if unknown:
            raise LaunchError(f"target {target.name}: the gateway does not accept {unknown.group(1).strip()!r} "
                              f"(remove it from extra_args or update the gateway).\n{tail}")
        raise LaunchError(f"target {target.name}: gateway did not become ready ({outcome}).\n{tail}")
    raise LaunchError(f"target {target.name}: could not bind a free port after 4 attempts")


def spawn_gateway(cmd: list[str], url: str, log_path: Path, target: str = "gateway",
                  max_concurrency: int | None = None, cwd: Path | None = None) -> GatewaySession:
    """Start `cmd`, a gateway that will answer at `url`, with its output in `log_path`; don't wait for it."""
    with log_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=cwd,
                                preexec_fn=_die_with_parent)
    return GatewaySession(url=url, target=target, max_concurrency=max_concurrency, proc=proc, log_path=log_path)


BOUND = "Uvicorn running on"


def wait_ready(session: GatewaySession, timeout_s: float, bound: str | None = BOUND) -> str:
    """"ready" once the gateway answers /v2/health/ready, else why not ("port_taken", "exited with code N",
    "not ready after Ns", the gateway then stopped).

    The answer must be ours: uvicorn logs `bound` ("Uvicorn running on") only once its own bind succeeded,
    so another server on the port is never taken for ours. That line is an info log: pass None for a
    gateway started with --log-level warning or above, and the port is trusted instead.
    """
    assert session.proc is not None and session.log_path is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if session.proc.poll() is not None:
            return "port_taken" if "address already in use" in log_tail(session.log_path) else \
                f"exited with code {session.proc.returncode}"
        if (bound is None or bound in log_tail(session.log_path, 20000)) and _ready(session.url):
            return "ready"
        time.sleep(0.2)
    session.stop()
    return f"not ready after {timeout_s:.0f}s"
