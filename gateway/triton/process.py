"""Start, watch and stop an embedded `tritonserver`.

The binary comes from the `nvidia-pytriton` wheel: Triton with the Python backend only, which runs on a
machine with no GPU and no Docker. Three things make it work from a virtual environment:
- its shared libraries sit in the wheel's `nvidia_pytriton.libs/` (LD_LIBRARY_PATH);
- the Python backend wants `libtriton_python.so` and the stub for our Python version in one directory;
- the stub embeds the system libpython and ignores PYTHONPATH, but it finds its interpreter by searching
  PATH for `python3`: with this environment's `bin/` first, the stub picks up the environment's
  `pyvenv.cfg` and so its site-packages (numpy, onnxruntime) for model code. That Python backend predates
  numpy 2 (every answer fails with "output tensor shape does not match size of output"), so Triton is not
  started beside numpy 2.

Triton and the stubs it starts (which run model code) get an allow-listed environment, never the gateway's
secrets (`gateway.isolation`), and every API but health answers only calls with the gateway's secret
(`gateway.triton.auth`), which is kept out of the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from gateway.isolation import child_env
from gateway.triton import auth

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """An unused TCP port on loopback (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: Triton gets SIGTERM if the gateway dies, so it is never orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def stub_numpy_problem(numpy_version: str | None) -> str | None:
    """Why the bundled Python backend cannot run beside this numpy, or None when it can."""
    if numpy_version is None:
        return "numpy is not installed in the environment the Python-backend stubs use; install 'numpy<2'"
    major = numpy_version.split(".", 1)[0]
    if major.isdigit() and int(major) >= 2:
        return (f"numpy {numpy_version} is installed in the environment the Python-backend stubs use ({sys.prefix}), "
                "but the bundled Triton's Python backend needs numpy 1.x (with numpy 2 every answer fails with "
                "'output tensor shape does not match size of output'); install 'numpy<2', for example "
                f"{sys.prefix}/bin/pip install 'numpy>=1.24,<2'")
    return None


def _installed_numpy() -> str | None:
    try:
        return importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class TritonPaths:
    """Where the wheel put Triton's pieces."""

    binary: Path
    libs: Path
    python_backend: Path
    stub: Path

    @classmethod
    def from_wheel(cls) -> "TritonPaths":
        site = Path(sysconfig.get_paths()["purelib"])
        root = site / "pytriton" / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        paths = cls(
            binary=root / "bin" / "tritonserver",
            libs=site / "nvidia_pytriton.libs",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
        )
        missing = [str(p) for p in (paths.binary, paths.libs, paths.python_backend, paths.stub) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"the embedded Triton needs the nvidia-pytriton wheel for Python {version}; missing: {missing}"
            )
        return paths


@dataclass
class TritonProcessConfig:
    model_repository: Path
    work_dir: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    start_timeout_s: float = 90.0
    stop_timeout_s: float = 30.0
    extra_args: list[str] = field(default_factory=list)
    api_key: str | None = None  # the restricted APIs' secret; None: a new random one for this TritonProcess


class TritonProcess:
    """One supervised tritonserver: ports chosen at start, log captured to `<work_dir>/triton.log`."""

    def __init__(self, config: TritonProcessConfig, paths: TritonPaths | None = None) -> None:
        self.config = config
        self.paths = paths or TritonPaths.from_wheel()
        self.http_port = config.http_port or free_port()
        self.grpc_port = config.grpc_port or free_port()
        self.metrics_port = config.metrics_port or free_port()
        self.log_path = config.work_dir / "triton.log"
        self.api_key = config.api_key or auth.new_key()  # kept across restarts: the clients hold it
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _backend_dir(self) -> Path:
        backends = self.config.work_dir / "backends"
        python = backends / "python"
        if not (python / "triton_python_backend_stub").exists():
            python.mkdir(parents=True, exist_ok=True)
            for item in self.paths.python_backend.iterdir():
                if item.is_file():
                    shutil.copy2(item, python / item.name)
            shutil.copy2(self.paths.stub, python / "triton_python_backend_stub")
        return backends

    def _env(self) -> dict[str, str]:
        """The allow-listed environment (no secrets reach model code), with the wheel's libraries and this
        environment's `bin/` first, where the stub looks for its interpreter."""
        env = child_env()
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.paths.libs), env.get("LD_LIBRARY_PATH")]))
        env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.prefix) / "bin"), env.get("PATH")]))
        return env

    def command(self) -> list[str]:
        return [
            str(self.paths.binary),
            f"--model-repository={self.config.model_repository}",
            f"--backend-directory={self._backend_dir()}",
            "--model-control-mode=explicit",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--allow-metrics=true",
            "--exit-timeout-secs=10",
            # Each start gets its own Python-backend shared-memory names: stubs of a Triton that was killed may
            # linger for a moment, and a new one must never attach to their regions.
            f"--backend-config=python,shm-region-prefix-name=mme{os.getpid()}s{self._starts}_",
            *auth.triton_args(self.api_key),
            *self.config.extra_args,
        ]

    def start(self) -> None:
        """Spawn tritonserver (returns at once; `wait_ready` bounds the start)."""
        problem = stub_numpy_problem(_installed_numpy())
        if problem:
            raise RuntimeError(problem)
        self.config.work_dir.mkdir(parents=True, exist_ok=True)
        self.config.model_repository.mkdir(parents=True, exist_ok=True)
        self._starts += 1
        cmd = self.command()
        log_file = self.log_path.open("ab")
        shown = " ".join(cmd).replace(self.api_key, "<secret>")
        log.info("triton.start", extra={"cmd": shown, "log": str(self.log_path)})
        self._proc = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._env(),
            cwd=self.config.work_dir,
            preexec_fn=_die_with_parent,
            start_new_session=True,  # its own process group: its stubs can be reaped with it (`reap`)
        )
        log_file.close()

    def reap(self) -> None:
        """Kill what is left of a Triton that exited: its Python-backend stubs, in its process group."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        log.info("triton.reaped", extra={"pgid": self._proc.pid})

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    async def wait_ready(self, is_ready: Callable[[], Awaitable[bool]]) -> None:
        """Poll readiness until the start bound; raise with the log's tail if Triton dies or never answers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout_s
        while loop.time() < deadline:
            if not self.running():
                raise RuntimeError(f"tritonserver exited with {self.exit_code()} during start:\n{self.log_tail()}")
            if await is_ready():
                log.info("triton.ready", extra={"http": self.http_url, "grpc": self.grpc_url})
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"tritonserver not ready after {self.config.start_timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, wait up to the stop bound, then SIGKILL."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.config.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("triton.kill", extra={"reason": "did not stop after SIGTERM"})
            proc.kill()
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # any stub still there: nothing is left behind
        log.info("triton.stopped")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
