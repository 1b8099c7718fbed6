"""Memory probes (host for real, NVML when a GPU is present) and process discovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import memory
from gateway.memory import (
    MIB,
    DeviceMemory,
    HostProbe,
    MemoryProbe,
    NvmlProbe,
    ProbeUnavailable,
    descendant_pids,
    detect_probe,
    stub_pids_by_model,
)


def _nvml_gpu_count() -> int:
    """How many GPUs pynvml sees here, checked independently of the code under test (0 if NVML is unusable)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


HAS_GPU = _nvml_gpu_count() > 0
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="NVML sees no GPU on this machine")


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start helper processes; every one, and anything it started, is killed and reaped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            for pid in reversed(descendant_pids(proc.pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
        proc.wait(timeout=10)


def _wait_for(predicate, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------------ probes


def test_host_probe_device_is_plausible() -> None:
    probe = HostProbe()
    assert probe.kind == "host"
    assert isinstance(probe, MemoryProbe)
    mem = probe.device()
    assert isinstance(mem, DeviceMemory)
    assert mem.total_bytes > 64 * MIB
    assert 0 < mem.free_bytes <= mem.total_bytes
    assert mem.used_bytes == mem.total_bytes - mem.free_bytes
    meminfo = Path("/proc/meminfo").read_text()
    total_kib = int(next(line for line in meminfo.splitlines() if line.startswith("MemTotal:")).split()[1])
    assert mem.total_bytes == total_kib * 1024


def test_host_probe_process_bytes() -> None:
    probe = HostProbe()
    own = probe.process_bytes([os.getpid()])
    assert own > MIB  # a Python interpreter with pytest loaded is well over 1 MiB resident
    dup = probe.process_bytes([os.getpid(), os.getpid()])
    assert abs(dup - own) < own / 2  # duplicates count once (RSS may drift a little between reads)
    assert probe.process_bytes([]) == 0
    assert probe.process_bytes([2**22 + 12345]) == 0  # beyond pid_max: no such process


def test_host_probe_process_bytes_sums(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    spawn.append(child)
    probe = HostProbe()
    assert _wait_for(lambda: probe.process_bytes([child.pid]) > 0)
    both = probe.process_bytes([os.getpid(), child.pid])
    assert both > probe.process_bytes([child.pid])


def test_detect_probe_auto_matches_nvml_visibility() -> None:
    probe = detect_probe("auto")
    try:
        assert probe.kind in {"nvml", "host"}
        assert probe.kind == ("nvml" if HAS_GPU else "host")
        mem = probe.device()
        assert mem.total_bytes > 0 and 0 <= mem.free_bytes <= mem.total_bytes
    finally:
        if isinstance(probe, NvmlProbe):
            probe.close()


def test_detect_probe_explicit_choices() -> None:
    assert isinstance(detect_probe("host"), HostProbe)
    assert isinstance(detect_probe(" HOST "), HostProbe)
    with pytest.raises(ValueError, match="auto, nvml, host"):
        detect_probe("tpu")


def test_detect_probe_nvml_without_gpu_raises() -> None:
    if HAS_GPU:
        pytest.skip("a GPU is present: 'nvml' must succeed here (covered by the NVML tests)")
    with pytest.raises(ProbeUnavailable, match="nvml"):
        detect_probe("nvml")


def test_nvml_probe_construction_never_fails() -> None:
    probe = NvmlProbe(index=999)  # lazy: nothing is touched until the first read
    probe.close()  # closing an unopened probe is a no-op
    with pytest.raises(ProbeUnavailable):
        probe.device()


@needs_gpu
def test_nvml_probe_reads_gpu() -> None:
    with detect_probe("nvml") as probe:  # type: ignore[attr-defined]
        assert probe.kind == "nvml"
        mem = probe.device()
        assert mem.total_bytes > 1024 * MIB
        assert 0 <= mem.free_bytes <= mem.total_bytes
        assert 0 <= mem.used_bytes <= mem.total_bytes
        assert probe.process_bytes([]) == 0
        assert probe.process_bytes([2**22 + 12345]) == 0
        assert probe.process_bytes([os.getpid()]) >= 0  # this process holds no CUDA context: usually 0
    probe.close()  # idempotent


@needs_gpu
def test_nvml_probe_sees_a_cuda_process(spawn: list[subprocess.Popen[bytes]]) -> None:
    """A child that creates a CUDA context shows up in process_bytes (needs torch or cupy; skipped otherwise)."""
    code = None
    for module, snippet in (
        ("torch", "import torch, time; x = torch.ones(64 << 20, device='cuda'); torch.cuda.synchronize()"),
        ("cupy", "import cupy, time; x = cupy.ones(64 << 20); cupy.cuda.runtime.deviceSynchronize()"),
    ):
        if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0:
            code = snippet + "; print('ready', flush=True); time.sleep(60)"
            break
    if code is None:
        pytest.skip("neither torch nor cupy is installed to create a CUDA context")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    spawn.append(child)
    assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
    with NvmlProbe() as probe:
        used = probe.process_bytes([child.pid])
        if used == 0:
            pytest.skip("NVML pids are not in this pid namespace (container without host pid namespace)")
        assert used >= 64 * MIB


# ------------------------------------------------------------------------------------------- processes


def test_descendant_pids_finds_children_and_grandchildren(spawn: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen(["sleep", "5"])
    spawn.append(child)
    # A shell whose own child is a grandchild of this test process.
    shell = subprocess.Popen(["sh", "-c", "sleep 5 & wait"])
    spawn.append(shell)
    assert _wait_for(lambda: child.pid in descendant_pids(os.getpid()) and len(descendant_pids(shell.pid)) >= 1)
    found = descendant_pids(os.getpid())
    assert child.pid in found and shell.pid in found
    grandchildren = descendant_pids(shell.pid)
    assert all(pid in found for pid in grandchildren)
    assert os.getpid() not in found
    assert found.index(shell.pid) < found.index(grandchildren[0])  # parents before children


def test_descendant_pids_edge_cases(spawn: list[subprocess.Popen[bytes]]) -> None:
    assert descendant_pids(2**22 + 12345) == []  # no such process
    child = subprocess.Popen(["sleep", "5"])
    spawn.append(child)
    assert _wait_for(lambda: child.pid in descendant_pids(os.getpid()))
    assert descendant_pids(child.pid) == []  # sleep has no children


def test_descendant_pids_scan_fallback_agrees(spawn: list[subprocess.Popen[bytes]]) -> None:
    """The /proc/*/stat scan (used where task/*/children is missing) sees the same child."""
    child = subprocess.Popen(["sleep", "5"])
    spawn.append(child)
    table = memory._children_map_by_scan()
    assert child.pid in table.get(os.getpid(), [])
    assert memory._parent_pid("123 (a) b) c) S 42 1 1") == 42  # comm with spaces and ')'


def test_stub_pids_by_model_attributes_each_stub_to_its_model(tmp_path: Path, spawn: list[subprocess.Popen[bytes]]) -> None:
    repo = tmp_path / "repo"
    sleeper = "import time; time.sleep(30)"
    stub_a = subprocess.Popen([sys.executable, "-c", sleeper, str(repo / "model_a" / "1" / "model.py")])
    stub_b = subprocess.Popen([sys.executable, "-c", sleeper, str(repo / "model_b" / "1" / "model.py")])
    stub_a10 = subprocess.Popen([sys.executable, "-c", sleeper, str(repo / "model_a10" / "1" / "model.py")])
    other = subprocess.Popen([sys.executable, "-c", sleeper, str(tmp_path / "elsewhere" / "model_a" / "model.py")])
    spawn.extend([stub_a, stub_b, stub_a10, other])
    expected = {"model_a": [stub_a.pid], "model_b": [stub_b.pid], "model_a10": [stub_a10.pid]}
    # Between fork and exec a child still shows its parent's cmdline: wait until all of them have exec'd.
    assert _wait_for(lambda: stub_pids_by_model(os.getpid(), repo) == expected)
    assert stub_pids_by_model(os.getpid(), tmp_path / "nothing-here") == {}
