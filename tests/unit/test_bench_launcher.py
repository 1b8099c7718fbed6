"""The gateway launcher: the command line it builds, and how it reports a flag the gateway rejects.

A small stand-in executable plays the gateway (argparse rejection, else a ready endpoint), so these run in
about a second; the real gateway is started by tests/e2e/test_bench.py.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from mme_bench.config import LauncherConfig, TargetConfig
from gateway.triton.process import free_port
from mme_bench.launcher import LaunchError, serve_command, spawn_gateway, start_gateway, wait_ready

FAKE = textwrap.dedent(f"""\
    #!{sys.executable}
    # Stands in for `python -m gateway serve`: rejects the flags in REJECT like argparse, else serves ready.
    import http.server, sys
    REJECT = {{"--shiny-new-flag"}}
    args = sys.argv[1:]
    bad = [a for a in args if a in REJECT]
    if bad:
        print("usage: mme-gateway serve ...", file=sys.stderr)
        print("mme-gateway: error: unrecognized arguments: " + " ".join(bad), file=sys.stderr)
        sys.exit(2)
    port = int(args[args.index("--port") + 1])

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Ready)
    if "warning" not in args:  # uvicorn's line is an info log
        print(f"Uvicorn running on http://127.0.0.1:{{port}}", flush=True)
    server.serve_forever()
""")


@pytest.fixture
def fake_python(tmp_path: Path) -> str:
    path = tmp_path / "fake-python"
    path.write_text(FAKE)
    path.chmod(0o755)
    return str(path)


def test_serve_command_passes_the_target_through() -> None:
    target = TargetConfig(name="t", instance_type="ml.g5.xlarge", memory_budget_bytes=10**9, max_concurrency=3,
                          extra_args=("--eviction-policy", "gdsf"))
    launcher = LauncherConfig(store="/s", python="/py", extra_args=("--log-level", "debug"))
    cmd = serve_command(target, launcher, Path("/c"), 1234, max_concurrency=None)
    assert cmd == ["/py", "-m", "gateway", "serve", "--store", "/s", "--cache-dir", "/c", "--port", "1234",
                   "--grpc-port", "0", "--instance-type", "ml.g5.xlarge", "--memory-budget-bytes", "1000000000",
                   "--max-concurrency", "3", "--log-level", "debug", "--eviction-policy", "gdsf"]
    # a concurrency benchmark's setting wins over the target's
    cmd8 = serve_command(target, launcher, Path("/c"), 1, max_concurrency=8)
    assert cmd8.count("--max-concurrency") == 1 and cmd8[cmd8.index("--max-concurrency") + 1] == "8"


def test_a_started_gateway_is_used_once_ready_and_stopped(fake_python: str, tmp_path: Path) -> None:
    launcher = LauncherConfig(store=str(tmp_path), python=fake_python, startup_timeout_s=20)
    session = start_gateway(TargetConfig(name="t"), launcher, tmp_path / "s", max_concurrency=4)
    try:
        assert session.url.startswith("http://127.0.0.1:") and session.max_concurrency == 4
        assert "Uvicorn running" in (tmp_path / "s" / "gateway.log").read_text()
    finally:
        session.stop(5)
    assert session.proc is not None and session.proc.poll() is not None


def test_a_gateway_logging_only_warnings_is_ready_by_its_port(fake_python: str, tmp_path: Path) -> None:
    port = free_port()
    session = spawn_gateway([fake_python, "--port", str(port), "--log-level", "warning"], f"http://127.0.0.1:{port}",
                            tmp_path / "gateway.log")
    try:
        assert wait_ready(session, 20, bound=None) == "ready"
    finally:
        session.stop(5)


def test_any_other_rejected_flag_fails_with_the_gateways_message(fake_python: str, tmp_path: Path) -> None:
    launcher = LauncherConfig(store=str(tmp_path), python=fake_python, startup_timeout_s=20)
    target = TargetConfig(name="t", extra_args=("--shiny-new-flag", "1"))
    with pytest.raises(LaunchError, match="does not accept '--shiny-new-flag'"):
        start_gateway(target, launcher, tmp_path / "s")


def test_a_url_target_is_used_as_it_is(tmp_path: Path) -> None:
    session = start_gateway(TargetConfig(name="t", url="http://10.0.0.1:8080/"), LauncherConfig(), tmp_path)
    assert session.url == "http://10.0.0.1:8080" and session.proc is None
    session.stop()  # nothing to stop
